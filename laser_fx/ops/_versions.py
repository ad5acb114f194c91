"""The in-place modification check of a compressed call: tensors its backward needs (inputs,
parameters) must keep the version they had in the forward, or the gradients would be
computed at the new values. Used by the eager (`laser_fx.ops.checkpoint`) and the traced
(`laser_fx.ops.traced`) compressed checkpoint."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import LaserFxError

__all__ = ["check_versions", "parameter_entries", "versions_of"]


def parameter_entries(params: Sequence[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``(what, tensor)`` of each parameter, for `versions_of`."""
    return [(f"parameter of shape {tuple(p.shape)}", p) for p in params]


def versions_of(entries: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, Any, int]]:
    """``(what, weakref, version)`` of each ``(what, tensor)``, for `check_versions`."""
    # A view passed as input (``x[:, 1:]``) dies after the call, but shares its version
    # counter with its base, which lives as long as anyone can modify it in place.
    return [(what, weakref.ref(t if t._base is None else t._base), t._version)
            for what, t in entries]


def check_versions(name: str, versions: Sequence[tuple[str, Any, int]]) -> None:
    """Raise if a tensor the backward of ``name`` needs was modified in place since
    `versions_of` recorded it (its gradients would be computed at the new values)."""
    for what, ref, version in versions:
        t = ref()
        if t is not None and t._version != version:
            raise LaserFxError(
                f"The compressed checkpoint of {name} needs its {what} for backward, "
                f"but it was modified in place after the forward (version {version} -> "
                f"{t._version}); its gradients would be computed at the new values. Do "
                "the in-place update after backward (e.g. optimizer.step() after "
                "loss.backward()), or clone the tensor before modifying it."
            )
