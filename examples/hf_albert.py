"""LASER on Hugging Face ALBERT: one shared layer applied ``num_hidden_layers`` times.

Builds a small `AlbertForSequenceClassification` from a config (random weights, 6 layers that
share one layer group), lists its weight-shared sites, compresses a deep copy in place with
`laser_fx.compress(model, example_kwargs=...)` (nothing is traced: one eager probe run finds
the shared `AlbertLayerGroup`, which is swapped for a wrapper), then trains the uncompressed
and the compressed model from the same weights on the same padded batches of a generated
task: "are there more A tokens than B tokens?". Prints activation memory, step time and
held-out loss / accuracy of both, and the per-site LASER report.

About 2-3 minutes on 2 CPU cores with default arguments; ``--quick`` takes seconds.

    PYTHONPATH=. python examples/hf_albert.py [--steps 150] [--mode auto] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AlbertConfig, AlbertForSequenceClassification

if __package__ in (None, ""):  # run as a file: make the `examples` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.hf_common import (  # noqa: E402
    Batch,
    Summary,
    add_common_args,
    compare,
    endless_batches,
    torch_threads,
)

__all__ = ["TOKEN_A", "TOKEN_B", "albert_config", "loss_fn", "main", "make_batch", "make_model"]

PAD, CLS = 0, 2
#: the two marker tokens whose majority is the label
TOKEN_A, TOKEN_B = 5, 6
_FIRST_FILLER = 7
_MAX_MARKERS = 9


def albert_config(vocab: int = 100, max_len: int = 64, layers: int = 6) -> AlbertConfig:
    """A small ALBERT: hidden 128, ``layers`` layers sharing one group, 4 heads, FFN 256.

    Dropout is off, so that the two arms compute the same function on the same batches
    (their dropout masks would differ) and their losses compare step by step.
    """
    return AlbertConfig(
        vocab_size=vocab, embedding_size=64, hidden_size=128, num_hidden_layers=layers,
        num_hidden_groups=1, inner_group_num=1, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=max_len, num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
        pad_token_id=PAD, use_cache=False,
    )


def make_model(config: AlbertConfig, seed: int) -> AlbertForSequenceClassification:
    """The seeded, randomly initialised classifier (in training mode)."""
    torch.manual_seed(seed)
    return AlbertForSequenceClassification(config).train()


def make_batch(
    gen: torch.Generator, batch: int, seq_len: int, vocab: int, min_len: int = 8
) -> Batch:
    """Padded sequences ``[CLS] tokens...`` with an odd number of A/B markers; label 1 iff A wins.

    The rule ("are there more A than B tokens?") needs every position of the sequence, and
    lengths are drawn in ``[min_len, seq_len]``, so every batch mixes lengths and carries a
    real ``attention_mask`` (1 on tokens, 0 on right padding) that the model must respect.

    Returns:
        `Batch` with ``input_ids``, ``attention_mask`` (``(batch, seq_len)``) and labels.
    """
    ids = torch.full((batch, seq_len), PAD, dtype=torch.long)
    mask = torch.zeros((batch, seq_len), dtype=torch.long)
    labels = torch.empty(batch, dtype=torch.long)
    lengths = torch.randint(min_len, seq_len + 1, (batch,), generator=gen)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0] = CLS
        ids[i, 1:n] = torch.randint(_FIRST_FILLER, vocab, (n - 1,), generator=gen)
        markers = 2 * int(torch.randint(0, min(_MAX_MARKERS, n - 1) // 2 + 1, (1,), generator=gen)) + 1
        markers = min(markers, n - 1 - (n % 2 == 1))  # odd and fits: no ties
        where = 1 + torch.randperm(n - 1, generator=gen)[:markers]
        is_a = torch.rand(markers, generator=gen) < 0.5
        ids[i, where] = torch.where(is_a, TOKEN_A, TOKEN_B)
        mask[i, :n] = 1
        labels[i] = int(2 * int(is_a.sum()) > markers)
    return Batch({"input_ids": ids, "attention_mask": mask}, labels)


def loss_fn(out: object, target: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Cross-entropy of the classifier logits; accuracy counts whole sequences."""
    logits = out.logits if hasattr(out, "logits") else out
    loss = F.cross_entropy(logits, target)
    return loss, int((logits.argmax(-1) == target).sum()), target.numel()


def main(argv: Sequence[str] | None = None) -> Summary:
    """Run the example with command-line ``argv``; returns the printed figures."""
    a = _parse(argv)
    with torch_threads(a.threads):
        return _run(a)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, steps=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=32, help="padded sequence length")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.batch, a.seq = min(a.steps, 3), 8, 24
    return a


def _run(a: argparse.Namespace) -> Summary:
    """Build, compress, train and report; ``a`` from `_parse`."""
    vocab, eval_batches = 100, 1 if a.quick else 16

    cfg = albert_config(vocab=vocab, max_len=64)
    gen = torch.Generator().manual_seed(a.seed)
    example = make_batch(gen, a.batch, a.seq, vocab)
    held_out = [make_batch(gen, 64, a.seq, vocab) for _ in range(eval_batches)]
    model = make_model(cfg, a.seed)
    print(f"ALBERT: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers sharing "
          f"{cfg.num_hidden_groups} group, {cfg.num_attention_heads} heads, FFN "
          f"{cfg.intermediate_size}, vocab {vocab}; batch {a.batch}, padded length {a.seq}")
    train = endless_batches(make_batch, gen, a.batch, a.seq, vocab)
    return compare(model, example, held_out, train, loss_fn, a,
                   desc="ALBERT majority", metric=f"{len(held_out) * 64} sequences")


if __name__ == "__main__":
    main()
