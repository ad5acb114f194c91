"""A call's arguments split into a constant layout and their tensors (for traced calls).

A traced checkpoint (`laser_fx.ops.traced`) hands dynamo's autograd.Function the call's
tensors as a flat list and everything else as a *layout*: nested tuples of Python constants
that dynamo folds while tracing, and that a layout id (`layout_id`) carries into the
``laser_fx::rerun`` op, whose arguments can only be tensors and plain values. Supported:
tensors, None, bools, ints, floats, strings, and tuples, lists and string-keyed dicts of
these (``layer(hidden_states=h, cos_sin=(cos, sin), attention_mask=None)``); anything else
makes the call an opaque one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["DTYPES", "layout", "layout_id", "rebuild", "tensors"]

#: dtypes a traced call's tensors may have, by code (the rerun op's fake needs each dtype)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
          torch.int32, torch.bool, torch.uint8, torch.int8, torch.int16)
_TENSOR = "tensor"
_CONSTANT = (type(None), bool, int, float, str)
#: layouts by id (`layout_id`); a few per traced call site
_LAYOUTS: list[Any] = []


def layout(obj: Any) -> Any:
    """The layout of ``obj`` (tensors replaced by a marker), or None if it has a leaf that
    is neither a tensor of a `DTYPES` dtype nor a constant."""
    if isinstance(obj, Tensor):
        return _TENSOR if obj.dtype in DTYPES else None
    if isinstance(obj, _CONSTANT):
        return ("const", obj)
    if isinstance(obj, (tuple, list)):
        parts = tuple(layout(o) for o in obj)
        if any(p is None for p in parts):
            return None
        return ("tuple" if isinstance(obj, tuple) else "list", parts)
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        parts = tuple((k, layout(v)) for k, v in obj.items())
        if any(p is None for _, p in parts):
            return None
        return ("dict", parts)
    return None


def tensors(obj: Any) -> list[Tensor]:
    """The tensors of ``obj``, in `layout` order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in tensors(o)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors(v)]
    return []


def rebuild(lay: Any, flat: Iterator[Tensor]) -> Any:
    """The object of layout ``lay`` with its tensors taken from ``flat`` in order."""
    if lay == _TENSOR:
        return next(flat)
    kind, parts = lay
    if kind == "const":
        return parts
    if kind == "dict":
        return {k: rebuild(p, flat) for k, p in parts}
    items = [rebuild(p, flat) for p in parts]
    return tuple(items) if kind == "tuple" else items


@torch._dynamo.assume_constant_result
def layout_id(lay: Any) -> int:
    """An id for ``lay`` (the same for equal layouts); a constant of the traced graph."""
    for i, known in enumerate(_LAYOUTS):
        if known == lay:
            return i
    _LAYOUTS.append(lay)
    return len(_LAYOUTS) - 1


def layout_of(index: int) -> Any:
    """The layout `layout_id` gave ``index``."""
    return _LAYOUTS[index]
