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
import inspect
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .config import LaserConfig
from .ops._compiled import register_site
from .ops.checkpoint import is_recomputing
from .packed import StorageStats
from .sites import Site
from .tracker import SubspaceTracker

__all__ = ["WRAPPED", "SiteWrapper", "TrackerStore", "begin_step", "call_site", "forward_origin",
           "tracker_stores"]

#: attribute under which a wrapper holds the original module (hidden from state dicts)
WRAPPED = "_laser_fx_module"
_PREFIX = WRAPPED + "."
#: attributes a `SiteWrapper` keeps for itself; every other write goes to the wrapped module
_OWN = frozenset({"site", "mechanism", "config", "stats", "trackers", "bypass", "calibration",
                  "slot_energy", "role", "roles", "root", "op_key"})
#: separates a slot from its role in a tracker's key (``"in0@3"``)
_ROLE = "@"
#: call sites beyond this many share the last role's trackers
_MAX_ROLES = 32
#: user frames (outside torch and laser_fx) that make a call site
_SITE_FRAMES = 4
_INTERNAL = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__]))
#: laser_fx's own test models are user code here: their lines tell their call sites apart
_USER_INSIDE = os.path.join(_INTERNAL[1], "testing") + os.sep


def call_site(root: tuple[str, int] | None = None,
              frames: Iterable[tuple[str, int, int]] | None = None
              ) -> tuple[tuple[str, int], ...]:
    """Where the current call comes from: the innermost `_SITE_FRAMES` frames of user code
    (files outside torch and laser_fx), as ``(file, line)`` pairs, up to the compressed
    model's own forward (``root``: its ``(file, first line)``), so that who calls the model
    (a training loop, a measurement) does not matter. A recursion written as
    ``z = net(z, y + x)`` in a loop and ``y = net(y, z)`` after it has two call sites.

    ``frames``: ``(file, line, first line)`` of each frame, innermost first, when the call
    is not this Python stack's (dynamo tracing the model: its translators' frames); by
    default the caller's stack."""
    if frames is None:
        frames = _python_frames(sys._getframe(1))
    site = []
    for filename, line, first in frames:
        if len(site) == _SITE_FRAMES:
            break
        if not filename.startswith(_INTERNAL) or filename.startswith(_USER_INSIDE):
            site.append((filename, line))
            if (filename, first) == root:
                break
    return tuple(site)


def _python_frames(frame: Any) -> Iterator[tuple[str, int, int]]:
    while frame is not None:
        yield frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_firstlineno
        frame = frame.f_back


def forward_origin(model: nn.Module) -> tuple[str, int] | None:
    """``(file, first line)`` of ``model``'s forward (`call_site`'s ``root``)."""
    code = getattr(inspect.unwrap(type(model).forward), "__code__", None)  # through decorators
    return None if code is None else (code.co_filename, code.co_firstlineno)


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
    #: the role of the call in progress (an index of its call site), or None
    role: int | None = None
    #: ``{call site: role}`` (`call_site`)
    roles: dict[tuple, int] | None = None
    #: the compressed model's forward (`forward_origin`): call sites stop there
    root: tuple[str, int] | None = None

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
        the width changed). A role is the call's site in the user's code: TRM's z-updates
        (one line, in a loop) and its y-update (another line) take inputs of different
        subspaces and get one basis each, while successive calls from one line, which
        resemble each other most, share theirs."""
        key = slot if self.role is None else f"{slot}{_ROLE}{self.role}"
        trk = self.trackers.get(key)
        if trk is None or trk.width != width:
            trk = self.trackers[key] = SubspaceTracker(width, self.slot_config(slot)).to(
                like.device)
        elif trk.basis.device != like.device:
            trk.to(like.device)
        return trk

    def input_dim(self, t: Tensor) -> int:
        """The feature axis of a checkpointed call's tensor input: 1 for a channels-first
        input of a convolution, else -1."""
        conv = set(self.site.conv_widths)
        other = set(self.site.widths) - conv
        return 1 if conv and t.ndim >= 3 and t.shape[1] in conv and t.shape[-1] not in other else -1

    def input_tracker(self, i: int, t: Tensor, dim: int) -> SubspaceTracker | None:
        """The tracker of a checkpointed call's ``i``-th tensor input (slot ``in<i>`` in the
        current role), or None to keep it exact: not floating, fewer than 2 dims, or fewer
        than ``config.min_numel`` elements."""
        if not t.is_floating_point() or t.ndim < 2 or t.numel() < self.config.min_numel:
            return None
        return self.tracker(f"in{i}", int(t.shape[dim]), t)

    def next_role(self) -> None:
        """A grad-enabled call begins: its role is its call site's (`call_site`)."""
        self.role = self.role_of(call_site(self.root))

    def role_of(self, site: tuple[tuple[str, int], ...]) -> int:
        """The role of calls from ``site`` (a new one for a new site)."""
        if self.roles is None:
            self.roles = {}
        role = self.roles.get(site)
        if role is None:
            role = self.roles[site] = min(len(self.roles), _MAX_ROLES - 1)
        return role

    def end_forward(self) -> None:
        """Take every tracker's pending decision, leaving refinements' Ritz steps open on an
        accelerator (`SubspaceTracker.end_forward`; `settle` takes them)."""
        for trk in self.trackers.values():
            trk.end_forward()

    def settle(self) -> None:
        """Take every tracker's open decision and refinement (`SubspaceTracker.settle`)."""
        for trk in self.trackers.values():
            trk.settle()

    def begin_step(self) -> None:
        """Start a new step's byte accounting."""
        self.stats = StorageStats()
        for trk in self.trackers.values():
            trk.begin_step()

    def reset(self) -> None:
        """Forget every basis and counter (as if freshly compressed)."""
        self.trackers = {}
        self.stats = StorageStats()
        self.roles = None


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
        self.op_key = register_site(self)  # how a compiled graph names this site
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
        if torch.compiler.is_compiling():
            if self.mechanism.traceable(self, args, kwargs):
                return self.mechanism.traced(self, args, kwargs)
            return self._opaque_call(args, kwargs)
        self.next_role()
        return self.mechanism.call(self, args, kwargs)

    @torch.compiler.disable
    def _opaque_call(self, args: tuple, kwargs: dict) -> Any:
        """A grad-enabled call under torch.compile that is not traced (`Mechanism.traceable`): one
        opaque call in the compiled graph (a graph break), whose block runs compiled on its
        own (`compiled_block`)."""
        self.next_role()
        return self.mechanism.call(self, args, kwargs, compiled=True)

    def compiled_block(self) -> nn.Module:
        """The wrapped module compiled with ``config.compile_backend`` (once; kept outside
        the module tree, so state dicts and ``.modules()`` do not see it), or the module
        itself when the backend is None."""
        if self.config.compile_backend is None:
            return self.wrapped
        compiled = self.__dict__.get("_compiled")
        if compiled is None:
            compiled = torch.compile(self.wrapped, backend=self.config.compile_backend)
            self.__dict__["_compiled"] = compiled
        return compiled

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_compiled", "_joint"):  # rebuilt on first use; compiled code stays
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.op_key = register_site(self)  # a copy is a site of its own

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

    # torch.compile(model) would trace these hooks: the trackers' decisions are data-dependent
    # Python (graph breaks, a recompile per value, RecursionError in dynamo): run them eagerly
    @torch.compiler.disable
    def __call__(self, model: nn.Module, *_: Any) -> None:
        if not torch.is_grad_enabled() or self.busy:
            return
        self.steps += 1
        if self.every and self.steps % self.every == 0:
            from .calibration import calibrate  # it imports this module

            args, kwargs = self.inputs
            calibrate(model, args, kwargs, target_cosine=self.target)  # sets `busy` meanwhile
        begin_step(model)

    @torch.compiler.disable
    def end(self, model: nn.Module, *_: Any) -> None:
        stores = tracker_stores(model)
        for store in stores:  # decide; on an accelerator refinements only queue their work
            store.end_forward()
        for store in stores:  # then finish them, all queued before the host waits
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
