"""Looped transformers as users build them from library layers: one
``nn.TransformerEncoderLayer`` applied n times, and a Hugging Face ALBERT (one layer group
shared by every layer) from an `AlbertConfig` with small sizes and random weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LoopedEncoder(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 32, heads: int = 4, loops: int = 3,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.loops = loops
        self.embed = nn.Embedding(vocab, d)
        self.layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=dropout,
                                                batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor, src_key_padding_mask: Tensor | None = None) -> Tensor:
        h = self.embed(tokens)
        for _ in range(self.loops):
            h = self.layer(h, src_key_padding_mask=src_key_padding_mask)
        return self.head(h)


def make_looped(seed: int = 0, **kw) -> LoopedEncoder:
    torch.manual_seed(seed)
    return LoopedEncoder(**kw).train()


def make_albert(seed: int = 0, dropout: float = 0.1, layers: int = 4):
    from transformers import AlbertConfig, AlbertModel

    cfg = AlbertConfig(
        vocab_size=40, embedding_size=16, hidden_size=32, num_hidden_layers=layers,
        num_hidden_groups=1, inner_group_num=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, classifier_dropout_prob=dropout, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return AlbertModel(cfg).train()


def tokens_and_mask(batch: int = 4, seq: int = 12, vocab: int = 20, seed: int = 0):
    """Random tokens and a padding mask (1 = token, 0 = right padding) with mixed lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    lengths = torch.tensor([seq, seq - 3, seq - 5, seq - 1][:batch])
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    return ids * mask, mask
