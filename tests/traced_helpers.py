"""What the tests of laser_fx's traced ops share: a loss, gradients of a plain backward, and a
TRM whose recursion lives in a user file (this one), so call sites are user lines."""

from __future__ import annotations

import torch
from torch import nn

from laser_fx.testing.zoo import TRMLike

#: traces the backward as inductor does, without a C++ build
BACKEND = "aot_eager"


def cumsum_loss(out: torch.Tensor) -> torch.Tensor:
    # not mean(out²): a LayerNorm output's mean square is ~1 whatever the weights
    return out.float().cumsum(-1).pow(2).mean()


def plain_grads(model: nn.Module, run, inputs, seed: int | None = None) -> torch.Tensor:
    """The gradients of a plain ``loss.backward()`` (what training loops call); ``seed``:
    set first (the same dropout masks for every model run with it)."""
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    cumsum_loss(run(*inputs)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


class UserTRM(TRMLike):
    """TRMLike with its recursion in this (user) file: call sites are user lines."""

    def _cycle(self, x, y, z):
        for _ in range(self.n):
            z = self.net(z, y + x)
        y = self.net(y, z)
        return y, z

    def forward(self, tokens):
        x = self.embed(tokens) * self.d ** 0.5
        y, z = self.y_init.expand_as(x), self.z_init.expand_as(x)
        with torch.no_grad():
            y, z = self._cycle(x, y, z)
        y, z = self._cycle(x, y, z)
        return self.lm_head(y)


def check_records_follow_their_graph(model: nn.Module, run, inputs, records: int) -> None:
    """A forward leaves ``records`` records, freed with its graph; ``retain_graph`` keeps
    them for a second backward, which gives the same gradients again."""
    import gc

    from laser_fx.ops import _compiled

    out = run(*inputs)
    assert len(_compiled.RECORDS) == records
    del out
    gc.collect()
    assert not _compiled.RECORDS
    loss = cumsum_loss(run(*inputs))
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    loss.backward()  # retain_graph: the records are still there, and give the same gradients
    for p, g in zip(model.parameters(), first, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)
    del loss
    gc.collect()
    assert not _compiled.RECORDS
