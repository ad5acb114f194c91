"""The one case that needs no module swap: a parameter applied 2+ times inside ONE call.

``for _ in range(n): h = torch.tanh(h @ self.W)`` in the model's own forward has no module
around the shared op to replace. `ParamSite` attaches to the module whose call applies the
parameter (often the model itself) through a forward pre-hook and an always-called forward
hook, and routes that parameter's linear / matmul ops inside the call to `compressed_linear`
(mechanism ``"linear"``). Nothing is swapped and no state-dict key changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import LaserConfig
from .mechanisms import MECHANISMS
from .mechanisms.linear import LinearOps
from .ops._compiled import register_site
from .ops.checkpoint import is_recomputing
from .packed import StorageStats
from .sites import Site
from .tracker import SubspaceTracker
from .wrapper import TrackerStore

__all__ = ["ParamSite", "param_sites_of"]


class ParamSite(TrackerStore):
    """Hooks that compress one parameter's linear ops inside each call of its owner module.

    Attributes:
        site: the parameter `Site`.
        mechanism: the ``"linear"`` mechanism (for its report row).
        config: the site's `LaserConfig`.
    """

    def __init__(self, site: Site, param: nn.Parameter, config: LaserConfig) -> None:
        self.site = site
        self.param = param
        self.mechanism = MECHANISMS["linear"]
        self.config = config
        self.stats = StorageStats()
        self.trackers: dict[str, SubspaceTracker] = {}
        self._open: list[tuple[LinearOps | None, tuple | None]] = []
        self.op_key = register_site(self)  # how a compiled graph names this site

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = []  # a call in progress does not travel
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.op_key = register_site(self)  # a copy is a site of its own

    def pre(self, module: nn.Module, args: Any) -> None:
        if not torch.is_grad_enabled() or is_recomputing() or self.bypass:
            self._open.append((None, []))
            return
        named = [(self.site.name, self.param)]
        if torch.compiler.is_compiling():  # the ops are traced, and count themselves
            mode = LinearOps(self, named, (self.op_key, -1), every=True)  # no roles, as eager
            before = None
        else:
            mode = LinearOps(self, named)
            before = (self.stats, self.stats.dense_bytes, self.stats.packed)
        mode.__enter__()
        self._open.append((mode, before))

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._open:
            return
        mode, before = self._open.pop()
        if mode is None:
            return
        mode.__exit__(None, None, None)
        if before is None:
            return
        # records and bases are counted by `compressed_linear`; one compressed call per
        # application of the parameter (not per call of the owner)
        stats, dense, packed = before
        if stats is not self.stats:  # a step began in between (its hook ran after ours)
            dense = packed = 0
        self.stats.uncompressed_bytes += self.stats.dense_bytes - dense
        self.stats.calls += self.stats.packed - packed

    def attach(self, owner: nn.Module) -> None:
        """Register the hooks on ``owner``."""
        owner.register_forward_pre_hook(self.pre)
        owner.register_forward_hook(self.post, always_call=True)

    def detach_from(self, owner: nn.Module) -> None:
        """Remove this site's hooks from ``owner``."""
        for key, hook in list(owner._forward_pre_hooks.items()):
            if getattr(hook, "__self__", None) is self:
                del owner._forward_pre_hooks[key]
        for key, hook in list(owner._forward_hooks.items()):
            if getattr(hook, "__self__", None) is self:
                del owner._forward_hooks[key]
                owner._forward_hooks_always_called.pop(key, None)


def param_sites_of(model: nn.Module) -> list[tuple[nn.Module, ParamSite]]:
    """``(owner, ParamSite)`` for every parameter site attached below ``model``."""
    found = []
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, ParamSite):
                found.append((m, owner))
    return found
