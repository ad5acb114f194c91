"""Mechanism ``"linear"``: each linear op of a call saves its input as tracked coefficients."""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .._weights import WeightOrigins
from ..ops._compiled import call_op, traced_role
from ..ops.linear import compressed_linear
from ..ops.region import _Kept
from ..ops.traced_linear import traced_linear
from ..packed import is_weight
from .base import Mechanism

__all__ = ["Linear", "LinearOps"]

_LINEAR = {F.linear}
_MATMUL = {torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.__matmul__}


class LinearOps(TorchFunctionMode):
    """Routes ``F.linear(x, W)`` and ``x @ W`` with ``W`` a parameter of the wrapped module (or
    a cast / transpose of one) to `compressed_linear`, one tracker per parameter.

    Args:
        state: anything with ``.tracker(slot, width, like)`` and ``.stats``: a
            `SiteWrapper`, a `ParamSite`.
        named_params: the ``(name, parameter)`` pairs to recognise.
        traced: ``(op key, role)`` of a call dynamo traces: the ops go to `traced_linear`.
        every: each op counts as a compressed call (a `ParamSite`), not only the first of
            the block call (with ``traced``; eager callers count their calls themselves).
    """

    def __init__(self, state: Any, named_params: Any, traced: tuple[int, int] | None = None,
                 every: bool = False) -> None:
        super().__init__()
        self.wrapper = state
        self.origins = WeightOrigins(named_params)
        self.traced = traced
        self.every = every
        self.first = True

    def _linear(self, name: str, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.traced is not None:
            first, self.first = self.first, self.every
            return traced_linear(*self.traced, name, first, x, weight, bias)
        return compressed_linear(x, weight, bias, self.wrapper.tracker(name, int(x.shape[-1]), x),
                                 self.wrapper.stats)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _LINEAR or func in _MATMUL) and args and torch.is_grad_enabled():
            weight = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
            name = self.origins.origin(weight)
            x = args[0]
            if (name is not None and isinstance(x, Tensor) and x.is_floating_point()
                    and x.ndim >= 2 and weight.ndim == 2 and weight.requires_grad):
                if func in _LINEAR:
                    bias = args[2] if len(args) > 2 else kwargs.get("bias")
                    return self._linear(name, x, weight, bias)
                return self._linear(name, x, weight.t(), None)  # X @ W == linear(X, Wᵀ)
        out = call_op(func, args, kwargs)
        self.origins.note(func, args, out)
        return out


class Linear(Mechanism):
    """`compressed_linear` for every linear op of a grad-enabled call (no re-run).

    Forward and ``grad_input`` are exact; ``grad_weight`` comes from the stored coefficients.
    The other tensors the call saves are kept as they are (their in-place modification is
    still detected).
    """

    name = "linear"

    def call(self, wrapper: Any, args: tuple, kwargs: dict, compiled: bool = False) -> Any:
        stats = wrapper.stats
        dense_before = stats.dense_bytes
        seen: dict[int, weakref.ref] = {}
        kept = 0

        def pack(t: Tensor) -> _Kept:  # what the call saves besides the compressed inputs
            nonlocal kept
            storage = t.untyped_storage()
            ref = seen.get(id(storage))
            if not is_weight(t) and (ref is None or ref() is not storage):
                seen[id(storage)] = weakref.ref(storage)
                kept += storage.nbytes()
            return _Kept(t)

        with torch.autograd.graph.saved_tensors_hooks(pack, _Kept.get), LinearOps(
            wrapper, wrapper.wrapped.named_parameters()
        ):
            out = wrapper.wrapped(*args, **kwargs)
        # the records and their bases are counted by `compressed_linear` (`add_packed`)
        stats.seen_bytes += kept
        stats.passthrough_bytes += kept
        stats.uncompressed_bytes += kept + stats.dense_bytes - dense_before
        stats.calls += 1
        return out

    def traceable(self, wrapper: Any, args: tuple, kwargs: dict) -> bool:
        return True  # nothing is re-run: any call traces, dropout included

    def traced(self, wrapper: Any, args: tuple, kwargs: dict) -> Any:
        key = wrapper.op_key
        with LinearOps(wrapper, wrapper.wrapped.named_parameters(), (key, traced_role(key))):
            return wrapper.wrapped(*args, **kwargs)
