"""Per-site state of a compressed model: modules whose buffers are the trackers' state.

``cmodel.laser_fx`` is a `LaserState`; ``cmodel.laser_fx.sites`` is an ``nn.ModuleDict`` with
one module per compressed site, and every use of a site in the graph calls that same module
(torchao's shared observer), so the printed graph names the site at each compressed use and
``state_dict``/``.to()``/``deepcopy`` carry the trackers along.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import GraphModule

from .config import LaserConfig
from .ops.checkpoint import StorageStats, compressed_checkpoint
from .ops.linear import compressed_linear
from .ops.region import CompressedRegion
from .passes.find_sites import Site
from .tracker import SubspaceTracker

__all__ = ["BlockSite", "LaserState", "LinearSite", "site_key"]


def site_key(name: str) -> str:
    """ModuleDict key of a site (module paths contain dots, keys cannot)."""
    return name.replace(".", "_")


class _SiteBase(nn.Module):
    def __init__(self, site: Site, mechanism: str, config: LaserConfig) -> None:
        super().__init__()
        self.site = site
        self.site_name = site.name
        self.mechanism = mechanism
        self.config = config

    def _active(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def tracker_list(self) -> list[SubspaceTracker]:
        return [m for m in self.modules() if isinstance(m, SubspaceTracker)]

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}, mechanism={self.mechanism!r}"


class LinearSite(_SiteBase):
    """An op site (linear or ``X @ W``) whose input is saved through one shared tracker."""

    def __init__(self, site: Site, config: LaserConfig) -> None:
        super().__init__(site, "linear", config)
        self.tracker = SubspaceTracker(site.width, config)

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if self.site.kind == "matmul":  # X @ W == linear(X, Wᵀ)
            weight = weight.t()
        if not self._active():
            return F.linear(x, weight, bias)
        return compressed_linear(x, weight, bias, self.tracker)


class BlockSite(_SiteBase):
    """A shared block whose calls run as outlined graphs under region or checkpoint.

    Trackers are per *slot*: the i-th activation a call stores (region) or its i-th input
    (checkpoint). Slot i of one recursion step is tracked from slot i of the previous step,
    which is what LASER's subspace tracking assumes. They are created at the first training
    call, when widths are known, and re-created from a state dict on load.
    """

    def __init__(self, site: Site, mechanism: str, config: LaserConfig) -> None:
        super().__init__(site, mechanism, config)
        self.slots = nn.ModuleDict()
        # Outlined calls are pure functions of their inputs; they hold no tensor of their
        # own, so they are kept out of the module tree (no second owner in state_dict).
        object.__setattr__(self, "_calls", {})
        self._is_param: dict[int, list[bool]] = {}
        self.last_stats = StorageStats()
        self.include_2d = True
        # follows `.to(...)` of the model: slots re-created on load go where the model is
        self.register_buffer("device_anchor", torch.empty(0), persistent=False)

    def add_call(self, call_index: int, module: GraphModule, is_param: Sequence[bool]) -> None:
        self._calls[call_index] = module
        self._is_param[call_index] = list(is_param)

    def slot(self, index: int, width: int, like: Tensor) -> SubspaceTracker:
        key = str(index)
        if key not in self.slots:
            self.slots[key] = SubspaceTracker(width, self.config).to(like.device)
        trk = self.slots[key]
        if trk.width != width:  # the block's call pattern changed (another input shape)
            trk = self.slots[key] = SubspaceTracker(width, self.config).to(like.device)
        return trk

    def begin_step(self) -> None:
        self.last_stats = StorageStats()

    def forward(self, call_index: int, *inputs: Any) -> Any:
        fn = self._calls[call_index]
        if not self._active():
            return fn(*inputs)
        if self.mechanism == "region":
            return self._region(fn, inputs)
        return self._checkpoint(fn, call_index, inputs)

    def _region(self, fn: GraphModule, inputs: tuple) -> Any:
        region = CompressedRegion(
            {}, self.config, widths=self.site.widths, slot_tracker=self.slot,
            stats=self.last_stats, include_2d=self.include_2d,
        )
        with region:
            return fn(*inputs)

    def _checkpoint(self, fn: GraphModule, call_index: int, inputs: tuple) -> Any:
        is_param = self._is_param[call_index]
        params = [t for t, p in zip(inputs, is_param) if p]
        acts = [t for t, p in zip(inputs, is_param) if not p]

        def run(*a: Any) -> Any:
            it_a, it_p = iter(a), iter(params)
            return fn(*[next(it_p) if p else next(it_a) for p in is_param])

        trackers = [
            self.slot(i, int(t.shape[-1]), t)
            if isinstance(t, Tensor) and t.is_floating_point() and t.ndim >= 2
            and t.numel() >= self.config.min_numel else None
            for i, t in enumerate(acts)
        ]
        grads = [p for p in params if isinstance(p, Tensor) and p.requires_grad]
        return compressed_checkpoint(run, trackers, *acts, params=grads, stats=self.last_stats)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Slots are created lazily; re-create the ones a saved state has before loading it.
        head = prefix + "slots."
        saved = {key[len(head):].split(".")[0] for key in state_dict if key.startswith(head)}
        for slot in [s for s in self.slots if s not in saved]:
            del self.slots[slot]  # not in the loaded state: it was created after that save
        for key, value in state_dict.items():
            if key.startswith(head) and key.endswith(".basis"):
                slot = key[len(head):].split(".")[0]
                if slot not in self.slots:
                    self.slots[slot] = SubspaceTracker(int(value.shape[0]), self.config).to(
                        self.device_anchor.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )


class LaserState(nn.Module):
    """Root of a compressed model's LASER state (``cmodel.laser_fx``).

    Called once at the start of every forward (a graph node): starts a new step's byte
    accounting when the step trains.
    """

    _is_impure = True  # fx's dead-code elimination must keep the call

    def __init__(self) -> None:
        super().__init__()
        self.sites = nn.ModuleDict()

    def forward(self) -> None:
        if self.training and torch.is_grad_enabled():
            for site in self.sites.values():
                for trk in site.tracker_list():
                    trk.begin_step()
                if isinstance(site, BlockSite):
                    site.begin_step()

    def reset(self) -> None:
        """Forget every basis and counter (as if freshly compressed)."""
        for site in self.sites.values():
            if isinstance(site, BlockSite):
                site.slots = nn.ModuleDict()
            else:
                old = site.tracker
                site.tracker = SubspaceTracker(old.width, site.config).to(old.basis.device)
