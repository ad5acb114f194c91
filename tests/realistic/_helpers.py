"""Helpers shared by the realistic-model tests: gradients, cosine, training steps."""

from __future__ import annotations

import torch
from torch import nn


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter gradients by name (zeros where a parameter got none).

    Names are the state-dict names: a compressed model's ``named_parameters`` shows the
    wrapper's ``_laser_fx_module.`` level (as torch's CheckpointWrapper does); dropped here.
    """
    return {n.replace("_laser_fx_module.", ""):
            (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten().double() for g in grads.values()])


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return float(torch.nn.functional.cosine_similarity(flat(a), flat(b), dim=0))


def assert_grads_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                       rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    assert any(w.abs().sum() > 0 for w in want.values()), "the reference got no gradient at all"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


def no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model
