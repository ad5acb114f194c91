"""`SiteWrapper`: what `compress` puts in place of a shared module.

The convention of torch's ``checkpoint_wrapper`` and PEFT's adapter injection: the wrapper
holds the original module as its only child, forwards attribute reads to it, and hides its
own prefix from ``state_dict`` / ``load_state_dict``, so checkpoints load into the
compressed and the uncompressed model alike. Its forward hands grad-enabled calls to the
site's mechanism (`laser_fx.mechanisms`); every other call is a plain call of the module.

Trackers are per-rank, rebuildable state: they are kept OUT of the module tree on purpose,
so that ``state_dict`` keys stay exactly the user's, DDP never broadcasts them (ranks have
bases of different ranks), and ``.to()`` needs no care (a tracker follows the activations'
device on its next call). ``copy.deepcopy`` and pickling carry them along.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from .config import LaserConfig
from .ops.checkpoint import is_recomputing
from .sites import Site
from .tracker import StorageStats, SubspaceTracker

__all__ = ["WRAPPED", "SiteWrapper", "TrackerStore", "begin_step", "tracker_stores"]

#: attribute under which a wrapper holds the original module (hidden from state dicts)
WRAPPED = "_laser_fx_module"
_PREFIX = WRAPPED + "."
#: attributes a `SiteWrapper` keeps for itself; every other write goes to the wrapped module
_OWN = frozenset({"site", "mechanism", "config", "stats", "trackers", "bypass", "calibration",
                  "slot_energy", "role", "step_calls"})
#: separates a slot from its role in a tracker's key (``"in0@3"``)
_ROLE = "@"
#: calls beyond this many in one step share the last position's trackers
_MAX_ROLES = 128


def _strip_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in list(state_dict):
        if key.startswith(prefix + _PREFIX):
            state_dict[prefix + key[len(prefix + _PREFIX):]] = state_dict.pop(key)


def _add_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for key in list(state_dict):
        if key.startswith(prefix) and not key.startswith(prefix + _PREFIX):
            state_dict[prefix + _PREFIX + key[len(prefix):]] = state_dict.pop(key)


class TrackerStore:
    """Per-site state shared by `SiteWrapper` and `laser_fx.param_site.ParamSite`: the site's
    trackers by slot (created at first use) and the byte accounting of the current step."""

    config: LaserConfig
    stats: StorageStats
    trackers: dict[str, SubspaceTracker]
    #: run plain calls, uncompressed (`laser_fx.calibrate` measures the exact gradient so)
    bypass: bool = False
    #: the `laser_fx.calibration.SiteCalibration` of this site, once calibrated
    calibration: Any = None
    #: per-slot energies chosen by `laser_fx.calibrate` (slots not listed use ``config``)
    slot_energy: dict[str, float] | None = None
    #: the role of the call in progress (its position among the step's calls), or None
    role: int | None = None
    #: grad-enabled calls of the site since the step began
    step_calls: int = 0

    def slot_config(self, slot: str) -> LaserConfig:
        """The config of ``slot``'s tracker: the site's, with a calibrated energy if any."""
        energy = (self.slot_energy or {}).get(slot)
        if energy is None:
            return self.config
        return dataclasses.replace(self.config, energy=energy, rank=None, fidelity=None)

    def slots(self) -> list[str]:
        """The slots whose trackers exist, in order of first use (roles folded)."""
        return list(dict.fromkeys(key.partition(_ROLE)[0] for key in self.trackers))

    def tracker(self, slot: str, width: int, like: Tensor) -> SubspaceTracker:
        """The tracker of ``slot`` in the current call's role (created, or re-created when
        the width changed). A role is the call's position in the step: the calls of a
        recursion differ by position (TRM's z-updates and y-update take different inputs),
        and one basis per position keeps each tracked from the same position a step ago."""
        key = slot if self.role is None else f"{slot}{_ROLE}{self.role}"
        trk = self.trackers.get(key)
        if trk is None or trk.width != width:
            trk = self.trackers[key] = SubspaceTracker(width, self.slot_config(slot)).to(
                like.device)
        elif trk.basis.device != like.device:
            trk.to(like.device)
        return trk

    def next_role(self) -> None:
        """A grad-enabled call begins: it takes the next position of the step."""
        self.role = min(self.step_calls, _MAX_ROLES - 1)
        self.step_calls += 1

    def settle(self) -> None:
        """Take every tracker's pending decision (`SubspaceTracker.settle`)."""
        for trk in self.trackers.values():
            trk.settle()

    def begin_step(self) -> None:
        """Start a new step's byte accounting and call positions."""
        self.stats = StorageStats()
        self.step_calls = 0
        for trk in self.trackers.values():
            trk.begin_step()

    def reset(self) -> None:
        """Forget every basis and counter (as if freshly compressed)."""
        self.trackers = {}
        self.stats = StorageStats()
        self.step_calls = 0


class SiteWrapper(TrackerStore, nn.Module):
    """Applies a site's mechanism to every grad-enabled call of the wrapped module.

    Attributes:
        site: the `Site` found by the probe run.
        mechanism: the `Mechanism` applied.
        config: the site's `LaserConfig`.
        stats: `StorageStats` of the calls since the last step began.
        trackers: ``{slot: SubspaceTracker}`` (created at first use).
    """

    def __init__(self, module: nn.Module, site: Site, mechanism: Any, config: LaserConfig) -> None:
        super().__init__()
        setattr(self, WRAPPED, module)
        self.site = site
        self.mechanism = mechanism
        self.config = config
        self.stats = StorageStats()
        self.trackers: dict[str, SubspaceTracker] = {}
        self.register_state_dict_post_hook(_strip_prefix)
        self.register_load_state_dict_pre_hook(_add_prefix)

    @property
    def wrapped(self) -> nn.Module:
        """The original module."""
        return self._modules[WRAPPED]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if not modules or WRAPPED not in modules or name == WRAPPED:
                raise
            return getattr(modules[WRAPPED], name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Writes reach the wrapped module too (``model.block.scale = 0.5`` must change what
        # the block computes), except the wrapper's own state and nn.Module's internals.
        modules = self.__dict__.get("_modules")
        if (modules and WRAPPED in modules and name not in self.__dict__
                and name not in _OWN and not hasattr(type(self), name)):
            setattr(modules[WRAPPED], name, value)
        else:
            super().__setattr__(name, value)

    def named_modules(self, memo: set | None = None, prefix: str = "",
                      remove_duplicate: bool = True):
        """The wrapper, then the wrapped module's tree under the SAME prefix: names seen from
        the model (``named_parameters``, ``named_modules``) are the user's, without the
        wrapper's attribute, so optimizer groups chosen by name keep working."""
        memo = set() if memo is None else memo
        if self not in memo or not remove_duplicate:
            if remove_duplicate:
                memo.add(self)
            yield prefix, self
        yield from self.wrapped.named_modules(memo, prefix, remove_duplicate)

    def __getitem__(self, key: Any) -> Any:  # a wrapped nn.Sequential block: model.body[0]
        return self.wrapped[key]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self.wrapped
        if not torch.is_grad_enabled() or is_recomputing() or self.bypass:
            return module(*args, **kwargs)
        self.next_role()
        return self.mechanism.call(self, args, kwargs)

    def extra_repr(self) -> str:
        return f"site={self.site.name!r}, mechanism={self.mechanism.name!r}"


class _StepHook:
    """Forward hooks of the compressed model: a grad-enabled forward starts a new step
    (pre-hook; with ``every``, every ``every``-th such step first re-calibrates the sites'
    energies on the stored micro-batch, `laser_fx.calibrate`), and its end takes the
    trackers' pending decisions (`end`), so none is left open when backward begins."""

    def __init__(self, every: int | None = None, inputs: tuple = (), target: float | None = None
                 ) -> None:
        self.every = every
        self.inputs = inputs  # (args, kwargs) of the micro-batch
        self.target = target
        self.steps = 0
        self.busy = False

    def __call__(self, model: nn.Module, *_: Any) -> None:
        if not torch.is_grad_enabled() or self.busy:
            return
        self.steps += 1
        if self.every and self.steps % self.every == 0:
            from .calibration import calibrate  # it imports this module

            args, kwargs = self.inputs
            calibrate(model, args, kwargs, target_cosine=self.target)  # sets `busy` meanwhile
        begin_step(model)

    def end(self, model: nn.Module, *_: Any) -> None:
        for store in tracker_stores(model):
            store.settle()


def tracker_stores(model: nn.Module) -> list[TrackerStore]:
    """Every site's state below ``model``: wrappers and parameter sites' hooks."""
    found: list[TrackerStore] = []
    for m in model.modules():
        if isinstance(m, SiteWrapper):
            found.append(m)
        for hook in m._forward_pre_hooks.values():
            store = getattr(hook, "__self__", None)
            if isinstance(store, TrackerStore):
                found.append(store)
    return found


def begin_step(model: nn.Module) -> None:
    """Start a new step's byte accounting in every site of ``model``."""
    for store in tracker_stores(model):
        store.begin_step()
