"""LASER on a looped Llama: one Hugging Face `LlamaDecoderLayer` applied R times.

A looped (Universal-style) transformer built from Hugging Face Llama parts with random
weights: token embedding, `LlamaRotaryEmbedding`, ONE `LlamaDecoderLayer` called ``loops``
times with the same weights (SDPA attention with a causal mask, no KV cache), final `LlamaRMSNorm` and
LM head. The loop is a Python ``for`` in `LoopedLlama.forward`: the probe run of
`laser_fx.compress` sees the layer called R times with grad (uses ``layer@0 .. layer@R-1``)
and swaps it, in place, for a wrapper; nothing is traced.

Trains the uncompressed model and a deep copy compressed in place, from the same weights on
the same batches of a generated next-token task (copy a random string after a separator),
and prints activation memory, step time, held-out loss / accuracy of both, and the per-site
report.

About 2-3 minutes on 2 CPU cores with default arguments; ``--quick`` takes seconds.

    PYTHONPATH=. python examples/hf_looped_llama.py [--steps 150] [--loops 4] [--mode auto]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

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

__all__ = ["IGNORE", "SEP", "LoopedLlama", "llama_config", "loss_fn", "main", "make_batch"]

SEP = 1
#: target value of positions that are not scored (the random first half)
IGNORE = -100
_FIRST_SYMBOL = 2


def llama_config(vocab: int = 32, max_len: int = 64) -> LlamaConfig:
    """A small Llama layer: hidden 128, 4 heads, SwiGLU 256, RoPE, no KV cache, no dropout."""
    return LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_len,
        attention_dropout=0.0, use_cache=False, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


class LoopedLlama(nn.Module):
    """Causal LM whose single Llama decoder layer is applied ``loops`` times (shared weights).

    Args:
        config: the Llama config of the layer (``num_hidden_layers`` is ignored).
        loops: how many times the layer is applied (the recursion depth R).
    """

    def __init__(self, config: LlamaConfig, loops: int) -> None:
        super().__init__()
        self.config, self.loops = config, loops
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)`` for ``input_ids`` ``(batch, seq)``."""
        h = self.embed_tokens(input_ids)
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
        rope = self.rotary_emb(h, positions)
        # An explicit additive causal mask: with attention_mask=None, causality would depend
        # on the attention implementation (SDPA infers it, eager attends everywhere).
        causal = torch.full((length, length), torch.finfo(h.dtype).min, device=h.device)
        causal = causal.triu(1)[None, None]
        for _ in range(self.loops):
            h = self.layer(h, attention_mask=causal, position_ids=positions,
                           position_embeddings=rope)
        return self.lm_head(self.norm(h))


def make_batch(gen: torch.Generator, batch: int, length: int, vocab: int) -> Batch:
    """Copy task: ``x_1..x_n SEP x_1..x_n``; targets are the next tokens of the second half.

    Returns:
        `Batch` with ``input_ids`` ``(batch, 2n+1)`` and next-token targets, `IGNORE` where
        the next token is random (the first half), so accuracy counts copied tokens.
    """
    x = torch.randint(_FIRST_SYMBOL, vocab, (batch, length), generator=gen)
    seq = torch.cat([x, torch.full((batch, 1), SEP), x], dim=1)
    target = torch.full_like(seq, IGNORE)
    target[:, length:-1] = seq[:, length + 1:]
    return Batch({"input_ids": seq}, target)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Next-token cross-entropy over scored positions; accuracy counts scored tokens."""
    scored = target != IGNORE
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE)
    correct = int(((logits.argmax(-1) == target) & scored).sum())
    return loss, correct, int(scored.sum())


def main(argv: Sequence[str] | None = None) -> Summary:
    """Run the example with command-line ``argv``; returns the printed figures."""
    a = _parse(argv)
    with torch_threads(a.threads):
        return _run(a)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p, steps=150)
    p.add_argument("--loops", type=int, default=4, help="applications R of the shared layer")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=12, help="string length n (sequence 2n+1)")
    p.add_argument("--vocab", type=int, default=16)
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.batch, a.loops = min(a.steps, 3), 8, min(a.loops, 3)
    return a


def _run(a: argparse.Namespace) -> Summary:
    """Build, compress, train and report; ``a`` from `_parse`."""
    eval_batches = 1 if a.quick else 16

    cfg = llama_config(vocab=a.vocab)
    gen = torch.Generator().manual_seed(a.seed)
    example = make_batch(gen, a.batch, a.length, a.vocab)
    held_out = [make_batch(gen, 64, a.length, a.vocab) for _ in range(eval_batches)]
    torch.manual_seed(a.seed)
    model = LoopedLlama(cfg, a.loops).train()
    print(f"Looped Llama: one decoder layer x {a.loops} loops, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, SwiGLU {cfg.intermediate_size}, vocab {a.vocab}; "
          f"batch {a.batch}, sequence {2 * a.length + 1}")
    train = endless_batches(make_batch, gen, a.batch, a.length, a.vocab)
    return compare(model, example, held_out, train, loss_fn, a,
                   desc="looped Llama copy", metric=f"copied tokens of {len(held_out) * 64} strings")


if __name__ == "__main__":
    main()
