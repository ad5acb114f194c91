"""Mechanism ``"region"``: activation-shaped tensors saved inside a call are stored low-rank."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from ..ops.region import CompressedRegion
from .base import Mechanism

__all__ = ["Region"]


class Region(Mechanism):
    """Saved-tensor hooks around every grad-enabled call of the module (`CompressedRegion`).

    No re-run: the i-th distinct tensor a call saves that is shaped like an activation along
    one of the site's widths is packed by tracker ``saved<i>``; parameters, attention
    internals and statistics stay exact.

    Under torch.compile the block runs compiled (`SiteWrapper.compiled_block`) inside the
    hooks, which then see what the compiled graph saves: fewer tensors (the partitioner
    recomputes cheap ones), some fused (a gate and up projection saved as one
    ``(rows, 2 * hidden)`` output), so any width counts when a tensor has the call's rows
    (``compiled<i>`` trackers). Its gradients are approximations of the same kind as eager
    region mode's, of other tensors: close to the exact ones, not bitwise the eager ones.
    """

    name = "region"

    def call(self, wrapper: Any, args: tuple, kwargs: dict, compiled: bool = False) -> Any:
        stats = wrapper.stats
        before = stats.seen_bytes
        block = wrapper.compiled_block() if compiled else wrapper.wrapped
        compiled = block is not wrapper.wrapped
        slot = "compiled" if compiled else "saved"
        region = CompressedRegion(
            {}, wrapper.config, widths=wrapper.site.widths, include_2d=True, stats=stats,
            rows=_rows(args, kwargs) if compiled else None,
            slot_tracker=lambda i, width, t: wrapper.tracker(f"{slot}{i}", width, t),
        )
        with region:
            out = block(*args, **kwargs)
        stats.uncompressed_bytes += stats.seen_bytes - before
        stats.calls += 1
        return out


def _rows(args: tuple, kwargs: dict) -> int | None:
    """Rows of the call's first floating input of >= 2 dims (all dims but the last)."""
    for t in tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim >= 2:
            return math.prod(t.shape[:-1])
    return None
