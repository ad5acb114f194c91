"""`compressed_linear`: ``F.linear`` whose saved input is stored in a tracked low-rank basis.

Forward is exactly ``F.linear`` (same kernel, bitwise equal output). Backward needs the input
only for ``grad_weight``; it uses the stored coefficients ``C = X Q`` and the basis version
``Q`` they were projected with: ``grad_weight = (dYᵀ C) Qᵀ`` (plus ``(dYᵀ 1) mᵀ`` for the row
mean ``m`` a centered record keeps). ``grad_input = dY W`` and
``grad_bias`` do not need the input and stay exact.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LaserFxError
from ..packed import Packed, StorageStats
from ..tracker import SubspaceTracker
from .region import _Kept

__all__ = ["compressed_linear"]


def _grad_weight(dy2: Tensor, packed: Packed, dtype: torch.dtype) -> Tensor:
    """``dYᵀ X̂`` from the packed input, in the order of fewer multiply-adds."""
    calc = torch.promote_types(dtype, torch.float32)  # bf16/fp16 grads accumulate in fp32
    dy2 = dy2.to(calc)
    if packed.dense is not None:
        return (dy2.T @ packed.dense.reshape(dy2.shape[0], -1).to(calc)).to(dtype)
    c = packed.coeffs.to(calc)
    q = packed.basis.to(calc)
    (n, out), (width, k) = dy2.shape, q.shape
    # (dYᵀ C) Qᵀ costs out·k·(n + width); dYᵀ (C Qᵀ) costs n·width·(k + out)
    if out * k * (n + width) <= n * width * (k + out):
        g = (dy2.T @ c) @ q.T
    else:
        g = dy2.T @ (c @ q.T)
    if packed.mean is not None:  # X̂ = C Qᵀ + 1 mᵀ  =>  dYᵀ X̂ gains (dYᵀ 1) mᵀ
        g += torch.outer(dy2.sum(0), packed.mean.to(calc))
    return g.to(dtype)


class _Record:
    """The record of one compressed linear's input, held as the pack result of an empty
    saved "token" tensor: autograd frees it with the saved tensors (after a backward without
    retain_graph, or with the graph), and the tracker may still revise it
    (`SubspaceTracker.settle`) before backward reads it."""

    __slots__ = ("__weakref__", "packed", "token")

    def __init__(self) -> None:
        self.packed: Packed | None = None
        self.token: Tensor | None = None

    @staticmethod
    def unpack(saved: Any) -> Tensor:
        return saved.token if isinstance(saved, _Record) else saved.get()


class _CompressedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, tracker: SubspaceTracker,
                stats: StorageStats | None, box: _Record):
        out = F.linear(x, weight, bias)
        box.packed = tracker.compress(x)
        if stats is not None:
            stats.add_packed(x, box.packed)
        box.token = torch.empty(0, device=x.device)
        ctx.save_for_backward(weight, box.token)  # the token is packed as the box itself
        ctx.box = weakref.ref(box)
        ctx.tracker = tracker
        # x is not saved, so autograd cannot see it modified in place: check its version
        # counter in backward (a view shares it with its base, which outlives the view)
        ctx.source = (weakref.ref(x if x._base is None else x._base), x._version)
        return out

    @staticmethod
    def backward(ctx, dy: Tensor):
        if torch.is_grad_enabled():
            raise LaserFxError(
                "compressed_linear does not support create_graph=True (double backward): its "
                "saved input is an approximation, so second derivatives through it would be "
                "wrong. Exclude this site from compression (`exclude=`) or call "
                "backward without create_graph."
            )
        x = ctx.source[0]()
        if x is not None and x._version != ctx.source[1]:
            raise LaserFxError(
                f"The input of shape {tuple(x.shape)} of a compressed linear was modified in "
                f"place after the forward (version {ctx.source[1]} -> {x._version}); plain F.linear "
                "would raise too, as its gradients would no longer match the forward. Do the "
                "in-place update after backward, or clone the tensor before modifying it."
            )
        weight, _ = ctx.saved_tensors  # unpacking needs the box: it is alive here
        packed = ctx.tracker.decided(ctx.box().packed)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = dy.matmul(weight.to(dy.dtype))
        dy2 = dy.reshape(-1, dy.shape[-1])
        if need_w:
            grad_w = _grad_weight(dy2, packed, weight.dtype)
        if need_b:
            grad_b = dy2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def compressed_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, tracker: SubspaceTracker,
    stats: StorageStats | None = None,
) -> Tensor:
    """``F.linear(x, weight, bias)`` that saves its input through ``tracker``.

    Compresses only when autograd will need the input (grad mode on and ``weight`` requires
    grad); otherwise it is plain ``F.linear`` and the tracker is not called.

    Args:
        x: input ``(..., in_features)``; ``in_features`` must equal ``tracker.width``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        tracker: the site's `SubspaceTracker`.
        stats: counts the record (`StorageStats.add_packed`), if given.

    Returns:
        ``F.linear(x, weight, bias)``, bitwise.

    Example::

        y = compressed_linear(x, layer.weight, layer.bias, tracker)
    """
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)
    box = _Record()

    def pack(t: Tensor) -> Any:
        return box if t is box.token else _Kept(t)

    with torch.autograd.graph.saved_tensors_hooks(pack, _Record.unpack):
        return _CompressedLinear.apply(x, weight, bias, tracker, stats, box)
