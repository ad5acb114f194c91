"""`compressed_linear`: ``F.linear`` whose saved input is stored in a tracked low-rank basis.

Forward is exactly ``F.linear`` (same kernel, bitwise equal output). Backward needs the input
only for ``grad_weight``; it uses the stored coefficients ``C = X Q`` and the basis version
``Q`` they were projected with: ``grad_weight = (dYᵀ C) Qᵀ`` (plus ``(dYᵀ 1) mᵀ`` for the row
mean ``m`` a centered record keeps). ``grad_input = dY W`` and
``grad_bias`` do not need the input and stay exact.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LaserFxError
from ..tracker import Packed, SubspaceTracker

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


class _CompressedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, tracker: SubspaceTracker):
        out = F.linear(x, weight, bias)
        packed = tracker.compress(x)
        if packed.dense is not None:
            # keep autograd's in-place modification check for the input we hold as it is
            ctx.save_for_backward(weight, x)
        else:
            # saved tensors, not ctx attributes: autograd frees them after a backward without
            # retain_graph and keeps them for a second backward with it
            kept = (packed.coeffs, packed.basis) + (() if packed.mean is None else (packed.mean,))
            ctx.save_for_backward(weight, *kept)
            # x is not saved, so autograd cannot see it modified in place: check its version
            # counter in backward (a view shares it with its base, which outlives the view)
            ctx.source = (weakref.ref(x if x._base is None else x._base), x._version)
        ctx.meta = (packed.shape, packed.dtype)
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
        source = getattr(ctx, "source", None)
        x = None if source is None else source[0]()
        if x is not None and x._version != source[1]:
            raise LaserFxError(
                f"The input of shape {tuple(x.shape)} of a compressed linear was modified in "
                f"place after the forward (version {source[1]} -> {x._version}); plain F.linear "
                "would raise too, as its gradients would no longer match the forward. Do the "
                "in-place update after backward, or clone the tensor before modifying it."
            )
        weight, *rest = ctx.saved_tensors
        shape, dtype = ctx.meta
        if len(rest) == 1:
            packed = Packed(shape=shape, dtype=dtype, dense=rest[0])
        else:
            packed = Packed(shape=shape, dtype=dtype, coeffs=rest[0], basis=rest[1],
                            mean=rest[2] if len(rest) == 3 else None)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = dy.matmul(weight.to(dy.dtype))
        dy2 = dy.reshape(-1, dy.shape[-1])
        if need_w:
            grad_w = _grad_weight(dy2, packed, weight.dtype)
        if need_b:
            grad_b = dy2.sum(0)
        return grad_x, grad_w, grad_b, None


def compressed_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, tracker: SubspaceTracker
) -> Tensor:
    """``F.linear(x, weight, bias)`` that saves its input through ``tracker``.

    Compresses only when autograd will need the input (grad mode on and ``weight`` requires
    grad); otherwise it is plain ``F.linear`` and the tracker is not called.

    Args:
        x: input ``(..., in_features)``; ``in_features`` must equal ``tracker.width``.
        weight: ``(out_features, in_features)``.
        bias: ``(out_features,)`` or None.
        tracker: the site's `SubspaceTracker`.

    Returns:
        ``F.linear(x, weight, bias)``, bitwise.

    Example::

        y = compressed_linear(x, layer.weight, layer.bias, tracker)
    """
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight, bias)
    return _CompressedLinear.apply(x, weight, bias, tracker)
