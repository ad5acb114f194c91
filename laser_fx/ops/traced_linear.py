"""`compressed_linear` inside a compiled graph: ``F.linear`` whose saved input is a token.

Under ``torch.compile``, mechanism ``"linear"`` routes a block's linear ops (`LinearOps`)
to `traced_linear`, an autograd.Function dynamo traces whole:

* forward: ``F.linear`` in the caller's graph, then ``laser_fx::pack_linear``, which stores
  the input with the tracker of its parameter and the call's role and returns a token
  (`laser_fx.ops._compiled`); the graph saves the token and the weight, not the input;
* backward: ``grad_input = dY W`` and ``grad_bias`` in the compiled backward graph (they do
  not need the input), and ``laser_fx::linear_grad_weight``, which computes
  ``grad_weight = dYᵀ X̂`` from the record without rebuilding ``X̂``
  (`laser_fx.ops.linear._grad_weight`).

Nothing is re-run, so randomness (dropout) in the block is the compiled graph's own, as
in an uncompressed compiled model. The input is read once, inside ``pack_linear``: the
record is a snapshot (``SubspaceTracker.compress(borrowed=True)``), so later in-place
updates of the input inside the graph do not reach it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._library.effects import EffectType

from ._compiled import new_token, record_of, site
from .linear import _grad_weight

__all__ = ["traced_linear"]


def traced_linear(key: int, role: int, slot: str, first: bool, x: Tensor, weight: Tensor,
                  bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` whose input is stored by the tracker of ``slot`` (a
    parameter's name) of site ``key`` in role ``role``; ``first``: the first linear op of
    its block call (counts the call). Call it only while dynamo traces the model."""
    return _TracedLinear.apply(key, role, slot, first, x, weight, bias)


class _TracedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, key: int, role: int, slot: str, first: bool, x: Tensor,
                weight: Tensor, bias: Tensor | None) -> Tensor:
        out = F.linear(x, weight, bias)
        ctx.save_for_backward(pack_linear(key, role, slot, first, x), weight)
        ctx.key = key
        return out

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        token, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[4:]
        dy2 = dy.reshape(-1, dy.shape[-1])
        grad_x = dy.matmul(weight.to(dy.dtype)) if need_x else None
        grad_w = linear_grad_weight(ctx.key, token, dy2, weight) if need_w else None
        grad_b = dy2.sum(0) if need_b else None
        return None, None, None, None, grad_x, grad_w, grad_b


@torch.library.custom_op("laser_fx::pack_linear", mutates_args=())
def pack_linear(key: int, role: int, slot: str, first: bool, x: Tensor) -> Tensor:
    """Store a linear op's input ``x`` with the tracker of ``slot`` in ``role`` (-1: none);
    returns the record's token."""
    wrapper = site(key)
    wrapper.role = None if role < 0 else role
    x = x.detach()
    tracker = wrapper.tracker(slot, int(x.shape[-1]), x)
    packed = tracker.compress(x, borrowed=True)
    stats = wrapper.stats
    stats.add_packed(x, packed)
    stats.uncompressed_bytes += x.numel() * x.element_size()
    stats.calls += first
    return new_token((tracker, packed))


# ordered: the partitioner may neither recompute it in backward (where the input it reads
# may be saved anyway: a tanh output) nor reorder it, so trackers see the forward's order
pack_linear.register_effect(EffectType.ORDERED)


@pack_linear.register_fake
def _(key: int, role: int, slot: str, first: bool, x: Tensor) -> Tensor:
    return torch.empty((), dtype=torch.int64)


@torch.library.custom_op("laser_fx::linear_grad_weight", mutates_args=())
def linear_grad_weight(key: int, token: Tensor, dy2: Tensor, weight: Tensor) -> Tensor:
    """``dY2ᵀ X̂`` (shaped and typed like ``weight``) from the record ``token`` names."""
    tracker, packed = record_of(token, site(key).site.name)
    return _grad_weight(dy2, tracker.decided(packed), weight.dtype).contiguous()


@linear_grad_weight.register_fake
def _(key: int, token: Tensor, dy2: Tensor, weight: Tensor) -> Tensor:
    return torch.empty(weight.shape, dtype=weight.dtype, device=dy2.device)  # contiguous
