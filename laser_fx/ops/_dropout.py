"""Dropout a traced checkpoint can replay: masks drawn from a per-call seed.

A traced call's forward runs inside the compiled graph, whose random stream a re-run in
backward cannot replay. Inside every traced call, `SeededDropout` routes ``F.dropout``
(what ``nn.Dropout`` calls) and the dropout of ``F.scaled_dot_product_attention`` to masks
that are a pure function of the call's seed and the dropout's index in the call
(``laser_fx::dropout_mask``); the re-run enters the same mode with the seed its record
keeps, and so draws the same masks, in the fused vjp graph as in the plain re-run.

The seed is drawn at the call's first dropout (a call without dropout draws none) from the
global CPU generator by ``laser_fx::seed``, an ordered op (never recomputed, merged or
moved), so ``torch.manual_seed`` makes a compiled run reproducible.
The masks are not the ones eager dropout would draw (neither are a compiled uncompressed
model's); their distribution is: each element kept with probability ``1 - p``, scaled by
``1 / (1 - p)``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._library.effects import EffectType
from torch.overrides import TorchFunctionMode

from ._compiled import call_op

__all__ = ["SeededDropout", "attention", "dropout_mask", "replayable", "replaying", "seed"]

#: the seed's range: exact in int64, and a generator accepts it
_SEED_RANGE = 2**62


@torch.library.custom_op("laser_fx::seed", mutates_args=())
def seed(key: int) -> Tensor:
    """A fresh seed (0-d CPU int64) from the global CPU generator, for site ``key``'s
    call (the argument keeps the op's calls apart)."""
    return torch.randint(_SEED_RANGE, (), dtype=torch.int64)


seed.register_effect(EffectType.ORDERED)  # one draw per call, in program order


@seed.register_fake
def _(key: int) -> Tensor:
    return torch.empty((), dtype=torch.int64)


@torch.library.custom_op("laser_fx::dropout_mask", mutates_args=())
def dropout_mask(seed: Tensor, index: int, like: Tensor, p: float) -> Tensor:
    """The keep mask (``like``'s shape, dtype and device; 0 or ``1 / (1 - p)``) of the
    ``index``-th dropout of the call seeded with ``seed``: the same arguments give the same
    mask."""
    gen = torch.Generator(like.device).manual_seed(
        (int(seed) * 1_000_003 + index) % _SEED_RANGE)
    keep = torch.rand(like.shape, generator=gen, device=like.device) >= p
    return keep.to(like.dtype) / (1.0 - p)


@dropout_mask.register_fake
def _(seed: Tensor, index: int, like: Tensor, p: float) -> Tensor:
    return torch.empty_like(like, memory_format=torch.contiguous_format)


class SeededDropout(TorchFunctionMode):
    """Routes ``F.dropout(x, p, training=True)`` with ``0 < p < 1`` (``nn.Dropout``, or
    called directly) to ``x *`` a `dropout_mask` of the call's seed (index: the order of the
    dropout calls in the mode), and ``F.scaled_dot_product_attention`` with ``dropout_p > 0``
    (Hugging Face's attention in training) to `attention` with such a mask.

    Args:
        key: the site's op key; with it, the seed is drawn (`seed`) at the first dropout, and
            stays None when the call has none.
        seed: the seed to replay (a re-run).
    """

    def __init__(self, key: int = 0, seed: Tensor | None = None) -> None:
        super().__init__()
        self.key = key
        self.seed = seed
        self.index = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p, training, inplace = _dropout_args(*args, **kwargs)
            if training and 0.0 < p < 1.0:
                mask = self._mask(x, p)
                return x.mul_(mask) if inplace else x * mask
        if func is F.scaled_dot_product_attention:
            q, k, v, attn_mask, p, is_causal, scale, gqa = _attention_args(*args, **kwargs)
            if 0.0 < p < 1.0:  # the fused kernel draws its own mask: the math, seeded
                return attention(q, k, v, attn_mask, is_causal, scale, gqa,
                                 lambda w: w * self._mask(w, p))
        return call_op(func, args, kwargs)

    def _mask(self, x: Tensor, p: float) -> Tensor:
        if self.seed is None:
            self.seed = seed(self.key)
        mask = dropout_mask(self.seed, self.index, x.detach(), p)
        self.index += 1
        return mask


def replaying(seed: Tensor | None) -> Any:
    """The context a re-run draws its forward's masks in: `SeededDropout` with the seed the
    record kept, or nothing when the forward drew none."""
    return contextlib.nullcontext() if seed is None else SeededDropout(seed=seed)


def _dropout_args(input: Tensor, p: float = 0.5, training: bool = True,
                  inplace: bool = False) -> tuple[Tensor, float, bool, bool]:
    return input, p, training, inplace


def _attention_args(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                    enable_gqa: bool = False) -> tuple:
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
              scale: float | None, enable_gqa: bool, drop: Any) -> Tensor:
    """``F.scaled_dot_product_attention`` written out (its documented math), with ``drop``
    applied to the attention weights in place of its dropout."""
    n_q, n_k = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if enable_gqa:
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
    w = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
        w = w.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        w = (w.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
             else w + attn_mask)
    return drop(w.softmax(-1)) @ v


def replayable(module: Any) -> bool:
    """Whether every dropout module of ``module`` in training mode is one `SeededDropout`
    replays (``nn.Dropout``; not ``Dropout1d/2d/3d`` nor alpha dropout: their masks are per
    channel or not a product)."""
    return not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training
                   and m.p > 0 and type(m) is not torch.nn.Dropout for m in module.modules())
