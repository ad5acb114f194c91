"""Check pass: the compressed graph is well formed and computes what the original computes.

Forward outputs must be equal (compression changes only what is stored for backward). The
check runs one training-mode forward with grad on the example inputs and then forgets every
basis it built, so the first real step still starts cold.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from ..errors import LaserFxError
from . import PassResult

__all__ = ["VerifyError", "verify"]


class VerifyError(LaserFxError):
    """The compressed module does not compute what the original computes."""


def _call(m: nn.Module, args: tuple, kwargs: dict, seed: int) -> Any:
    torch.manual_seed(seed)
    return m(*args, **kwargs)


def verify(
    gm: GraphModule,
    reference: nn.Module | None = None,
    args: tuple = (),
    kwargs: dict | None = None,
) -> PassResult:
    """Lint ``gm`` and, with example inputs, compare its outputs with ``reference``'s."""
    gm.graph.lint()
    kwargs = kwargs or {}
    if reference is None or not (args or kwargs):
        return PassResult(gm, modified=False, record={"compared": False})
    state = getattr(gm, "laser_fx", None)
    rng = torch.get_rng_state()
    try:
        with torch.enable_grad():
            want = _call(reference, args, kwargs, seed=0)
            got = _call(gm, args, kwargs, seed=0)
    finally:
        torch.set_rng_state(rng)
        if state is not None:
            state.reset()
    want_leaves, want_spec = pytree.tree_flatten(want)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if want_spec != got_spec:
        raise VerifyError(f"compressed output structure {got_spec} differs from {want_spec}")
    for i, (a, b) in enumerate(zip(want_leaves, got_leaves)):
        if isinstance(a, torch.Tensor):
            try:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            except AssertionError as e:
                raise VerifyError(
                    f"output {i} of the compressed module differs from the original's: {e}. "
                    "Please report this with the model: compression must not change the forward."
                ) from e
    return PassResult(gm, modified=False, record={"compared": True})
