"""Mechanism ``"region"``: activation-shaped tensors saved inside a call are stored low-rank."""

from __future__ import annotations

from typing import Any

from ..ops.region import CompressedRegion
from .base import Mechanism

__all__ = ["Region"]


class Region(Mechanism):
    """Saved-tensor hooks around every grad-enabled call of the module (`CompressedRegion`).

    No re-run: the i-th distinct tensor a call saves that is shaped like an activation along
    one of the site's widths is packed by tracker ``saved<i>``; parameters, attention
    internals and statistics stay exact.
    """

    name = "region"

    def call(self, wrapper: Any, args: tuple, kwargs: dict, compiled: bool = False) -> Any:
        stats = wrapper.stats
        before = stats.seen_bytes
        region = CompressedRegion(
            {}, wrapper.config, widths=wrapper.site.widths, include_2d=True, stats=stats,
            slot_tracker=lambda i, width, t: wrapper.tracker(f"saved{i}", width, t),
        )
        with region:
            out = wrapper.wrapped(*args, **kwargs)
        stats.uncompressed_bytes += stats.seen_bytes - before
        stats.calls += 1
        return out
