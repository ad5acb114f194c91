"""Language models that unroll an ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` over time,
with an ``nn.Linear`` output head applied at every step. Own code."""

from __future__ import annotations

import torch
from torch import Tensor, nn

CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}


class CellLM(nn.Module):
    def __init__(self, cell: str, vocab: int = 16, emb: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.kind = cell
        self.hidden = hidden
        self.embed = nn.Embedding(vocab, emb)
        self.cell = CELLS[cell](emb, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        b, t = tokens.shape
        x = self.embed(tokens)
        h = x.new_zeros(b, self.hidden)
        c = x.new_zeros(b, self.hidden)
        logits = []
        for i in range(t):
            if self.kind == "lstm":
                h, c = self.cell(x[:, i], (h, c))
            else:
                h = self.cell(x[:, i], h)
            logits.append(self.head(h))
        return torch.stack(logits, dim=1)


def make_lm(cell: str, seed: int = 0, **kw) -> CellLM:
    torch.manual_seed(seed)
    return CellLM(cell, **kw).train()


def lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
