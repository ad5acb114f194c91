"""Compressed (selective) region: activation-shaped saved tensors stored low-rank.

Inside one call of a shared block, every tensor autograd saves passes through a pack hook.
Only tensors shaped like activations along a model width are routed to the tracker of that
width; everything whose error backward would amplify stays exact: parameters and weight
views, integer/bool tensors, small tensors, per-head attention tensors (4-D q/k/v, outputs,
probabilities), softmax/normalization statistics (last dim 1 or not a model width), and by
default the flattened 2-D inputs of linear layers. The measured reason (DESIGN.md, "Where
the memory is"): storing every saved tensor at 99% energy collapsed a small TRM's training,
while storing only the 3-D activations did not.

Saved-tensor hooks stack and only the innermost sees a tensor: a region opened inside a
`compressed_checkpoint` block does nothing (its forward runs without grad and its backward
re-run is never compressed), and a region inside another region hides the outer one.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..config import LaserConfig
from ..errors import ConfigError, LaserFxError
from ..packed import StorageStats, is_weight
from .checkpoint import is_recomputing

__all__ = ["CompressedRegion", "compressed_region"]


def _modified(source: weakref.ref, version: int, shape: tuple) -> LaserFxError | None:
    t = source()
    if t is None or t._version == version:
        return None
    return LaserFxError(
        f"A tensor of shape {shape} saved for backward inside a compressed region was modified "
        f"in place after the forward (version {version} -> {t._version}); its gradients would "
        "be computed at the new values. Do the in-place update after backward (e.g. "
        "optimizer.step() after loss.backward()), or clone the tensor before modifying it."
    )


class _Kept:
    """A saved tensor kept as it is. Saved-tensor hooks switch off autograd's in-place check,
    so the version counter is checked here instead."""

    __slots__ = ("tensor", "version")

    def __init__(self, t: torch.Tensor) -> None:
        self.tensor = t
        self.version = t._version

    def get(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise _modified(weakref.ref(self.tensor), self.version, tuple(self.tensor.shape))
        return self.tensor


class _Handle:
    """What autograd keeps for one packed tensor; all saves of that tensor share it."""

    __slots__ = ("_recon", "packed", "source", "tracker", "version")

    def __init__(self, tracker: Any, packed: Any, source: torch.Tensor) -> None:
        self.tracker = tracker
        self.packed = packed
        # A saved view (the flattened input of a linear) dies once packed; its base shares
        # the version counter and lives as long as anyone can modify it in place.
        self.source = weakref.ref(source if source._base is None else source._base)
        self.version = source._version
        self._recon: weakref.ref[torch.Tensor] | None = None

    def get(self) -> torch.Tensor:
        err = _modified(self.source, self.version, tuple(self.packed.shape))
        if err is not None:
            raise err
        # One reconstruction shared by every op that saved the tensor, but held only weakly:
        # a strong cache would bring the dense bytes back for the rest of backward.
        x = self._recon() if self._recon is not None else None
        if x is None:
            x = self.tracker.decompress(self.packed)
            self._recon = weakref.ref(x)
        return x


class CompressedRegion:
    """Saved-tensor hooks for one call of a shared block (use as a context manager).

    Attributes:
        stats: `StorageStats` of every call made with this object.
        trackers: ``{width: tracker}`` used for packing (plus any made by ``tracker_factory``).

    See `compressed_region` for the arguments.
    """

    def __init__(
        self,
        trackers_by_width: Mapping[int, Any],
        config: LaserConfig,
        *,
        include_2d: bool = False,
        exclude_rules: bool = True,
        batch_shape: tuple[int, ...] | torch.Size | None = None,
        tracker_factory: Callable[[int], Any] | None = None,
        slot_tracker: Callable[[int, int, torch.Tensor], Any] | None = None,
        widths: Iterable[int] = (),
        rows: int | None = None,
        stats: StorageStats | None = None,
    ) -> None:
        if not isinstance(config, LaserConfig):
            raise ConfigError(f"`config` must be a LaserConfig, got {type(config).__name__}.")
        self.trackers = {int(w): t for w, t in trackers_by_width.items()}
        for w, t in self.trackers.items():
            if getattr(t, "width", w) != w:
                raise ConfigError(
                    f"tracker under width {w} has width {t.width}; key it by its width."
                )
        self.config = config
        self.include_2d = include_2d
        self.exclude_rules = exclude_rules
        self.batch_shape = tuple(batch_shape) if batch_shape is not None else None
        self.tracker_factory = tracker_factory
        # Slot mode: the i-th distinct tensor a call packs goes to slot_tracker(i, width, t),
        # so each saved activation is tracked across recursion steps by its own basis.
        self.slot_tracker = slot_tracker
        self.widths = {int(w) for w in widths} | set(self.trackers)
        # a compiled block saves fused tensors (e.g. a gate and up projection as one
        # (rows, 2 * hidden) output): any width counts when the rows are the call's
        self.rows = rows
        self._slots = 0
        self.stats = StorageStats() if stats is None else stats
        self._cache: dict[tuple[Any, ...], tuple[weakref.ref[Any], _Handle]] = {}
        self._hooks: Any = None

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> CompressedRegion:
        if self._hooks is not None:
            raise ConfigError("this CompressedRegion is already open; use one object per call.")
        if torch.is_grad_enabled() and not is_recomputing():
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        hooks, self._hooks = self._hooks, None
        self._cache.clear()  # dedupe only within one call
        self._slots = 0
        if hooks is not None:
            hooks.__exit__(*exc)

    # ------------------------------------------------------------------ selection
    def _width_for(self, t: torch.Tensor) -> int | None:
        """The width `t` is packed along, or None to keep it exactly."""
        # Parameters and tensor subclasses (fake/meta tensors of a tracer) are never packed.
        if type(t) is not torch.Tensor or t.device.type == "meta":
            return None
        if not t.is_floating_point() or t.ndim < 2 or is_weight(t):
            return None
        if t.numel() < self.config.min_numel or t.shape[-1] < 2:
            return None
        width = int(t.shape[-1])
        if not self.exclude_rules:  # indiscriminate variant, for measurements
            if width not in self.widths and self.tracker_factory is not None:
                self.trackers[width] = self.tracker_factory(width)
                self.widths.add(width)
            return width if width in self.widths else None
        if width not in self.widths and not (
                self.rows is not None and t.ndim in (2, 3) and t.numel() // width == self.rows):
            return None
        if t.ndim == 3:
            if self.batch_shape is not None and tuple(t.shape[:2]) != self.batch_shape:
                return None
            return width
        if t.ndim == 2 and self.include_2d:
            if self.batch_shape is not None and t.shape[0] != math.prod(self.batch_shape):
                return None
            return width
        return None

    def _tracker_for(self, t: torch.Tensor) -> Any | None:
        """The width-keyed tracker `t` would be packed with, or None (selection rules only)."""
        width = self._width_for(t)
        if width is None:
            return None
        return self.trackers.get(width) if self.slot_tracker is None else self.slot_tracker

    # ------------------------------------------------------------------ hooks
    def _pack(self, t: torch.Tensor) -> Any:
        width = self._width_for(t)
        if width is None:
            self.stats.add_passthrough(t)
            return _Kept(t)
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        hit = self._cache.get(key)
        # The weak reference proves the storage is the same one still alive: after a free,
        # the allocator may hand the same address to a different tensor.
        if hit is not None and hit[0]() is storage:
            self.stats.deduped += 1
            return hit[1]
        if self.slot_tracker is not None:
            tracker = self.slot_tracker(self._slots, width, t)
            self._slots += 1
        else:
            tracker = self.trackers[width]
        handle = _Handle(tracker, tracker.compress(t), t)
        self._cache[key] = (weakref.ref(storage), handle)
        self.stats.add_packed(t, handle.packed)
        return handle

    @staticmethod
    def _unpack(h: Any) -> torch.Tensor:
        return h.get()


def compressed_region(
    trackers_by_width: Mapping[int, Any],
    config: LaserConfig,
    *,
    include_2d: bool = False,
    exclude_rules: bool = True,
    batch_shape: tuple[int, ...] | torch.Size | None = None,
    tracker_factory: Callable[[int], Any] | None = None,
) -> CompressedRegion:
    """Context manager storing a block call's activation-shaped saved tensors low-rank.

    Active only when grad is enabled (and not during a checkpoint's backward re-run). A
    tensor is packed through ``trackers_by_width[t.shape[-1]]`` when it is floating, 3-D
    ``(batch, seq, width)``, has at least ``config.min_numel`` elements and is not a
    parameter, a leaf requiring grad or a view of one; everything else is kept exactly. A
    tensor saved by several ops is packed once per call and reconstructed once while in use.
    The hooks are removed on exit, also when the forward raises.

    Args:
        trackers_by_width: ``{width: SubspaceTracker}`` of the block's model widths.
        config: the site's `LaserConfig` (``min_numel`` is read here).
        include_2d: also pack 2-D ``(tokens, width)`` tensors, i.e. the flattened inputs of
            linear layers (off by default: DESIGN.md's best measured row left them out).
        exclude_rules: False packs every floating non-weight tensor of >= ``min_numel``
            elements along its last dim (attention q/k/v, probabilities, statistics too),
            the indiscriminate variant that collapsed training; for measurements only.
        batch_shape: ``(batch, seq)`` of the block's activations; when given, 3-D tensors
            must start with it (and 2-D ones have ``batch * seq`` rows). This keeps apart a
            ``(batch, heads, seq)`` softmax statistic whose ``seq`` equals a model width.
        tracker_factory: ``width -> tracker`` for widths missing from ``trackers_by_width``
            when ``exclude_rules=False`` (without it those tensors are kept exactly).

    Returns:
        A `CompressedRegion`; its ``stats`` hold the bytes seen and stored.

    Example::

        with compressed_region({64: trk64, 192: trk192}, cfg, batch_shape=z.shape[:2]):
            z = net(z, y + x)
    """
    return CompressedRegion(
        trackers_by_width,
        config,
        include_2d=include_2d,
        exclude_rules=exclude_rules,
        batch_shape=batch_shape,
        tracker_factory=tracker_factory,
    )
