"""Which parameter a tensor is, also through casts and transposes.

``CastedLinear`` (the TRM / HRM references, every bf16 config) applies
``F.linear(x, self.weight.to(x.dtype))``: the op's weight argument is a cast of the
parameter, not the parameter. Inside a `TorchFunctionMode`, `WeightOrigins` follows the
parameter through such casts so that the op is still recognised as applying it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["WeightOrigins"]

#: Tensor methods through which a weight keeps its identity (casts, transposes, ``.T``)
_CASTS = {"to", "type", "float", "half", "bfloat16", "double", "t", "contiguous", "T", "mT",
          "transpose", "__get__"}


class WeightOrigins:
    """Maps tensors to the name of the parameter they are (or are a cast / transpose of).

    Args:
        named_params: ``(name, parameter)`` pairs to recognise.
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]]) -> None:
        # dynamo cannot trace a WeakIdKeyDictionary, and older releases (2.11) neither `id()`
        # of a tensor computed in the graph nor `next()` of a generator: while it traces,
        # parameters and derived tensors are (tensor, name) pairs compared by identity in
        # plain loops (the trace holds them anyway)
        self._tracing = torch.compiler.is_compiling()
        pairs = [(p, n) for n, p in named_params]
        self._pairs = pairs if self._tracing else []
        self._params = {} if self._tracing else {id(p): n for p, n in pairs}
        self._derived: WeakIdKeyDictionary | list[tuple[torch.Tensor, str]] = (
            [] if self._tracing else WeakIdKeyDictionary())

    def origin(self, t: object) -> str | None:
        """The parameter name ``t`` comes from, or None."""
        if not isinstance(t, torch.Tensor):
            return None
        if self._tracing:
            for known, name in (*self._pairs, *self._derived):
                if known is t:
                    return name
            return None
        name = self._params.get(id(t))
        return name if name is not None else self._derived.get(t)

    def note(self, func: object, args: tuple, out: object) -> None:
        """Record ``out`` as derived from a parameter when ``func`` is a cast of one."""
        if (args and isinstance(out, torch.Tensor)
                and getattr(func, "__name__", "") in _CASTS):
            name = self.origin(args[0])
            if name is None:
                return
            if isinstance(self._derived, list):
                self._derived.append((out, name))
            else:
                self._derived[out] = name
