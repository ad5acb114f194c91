"""Discovery by one eager probe run: which modules and parameters a forward really shares.

The model runs once, as the user's Python runs it (data-dependent loops, dataclass carries,
einops, casts), with

* a forward pre-hook and hook on every submodule: which module is called, how often, inside
  which other calls, with grad enabled or not, on which input shapes;
* saved-tensor hooks that measure what autograd keeps during each call (keeping the tensors
  as they are);
* a `TorchFunctionMode` that sees which parameter each linear / matmul / conv op consumes,
  also through a cast (``F.linear(x, self.weight.to(x.dtype))``), so parameters applied
  outside a module call of their own (``X @ W`` in a loop) are found too.

Everything the run touches is put back afterwards (`laser_fx._isolated.isolated`): buffers,
RNG streams, grad mode, train flags, also when the forward raises.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ._isolated import cuda_devices, isolated
from ._weights import WeightOrigins
from .errors import ConfigError
from .packed import is_weight
from .sites import Site, Use

__all__ = ["Probe", "find_sites", "probe", "run_model"]

_LINEAR = {F.linear}
_MATMUL = {torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.__matmul__}
_CONV = {F.conv1d, F.conv2d, F.conv3d}
_CONV_MODULES = (nn.modules.conv._ConvNd,)


@dataclass(eq=False)
class _Call:
    module: nn.Module
    index: int
    grad: bool
    shape: tuple[int, ...] | None
    input_widths: tuple[int, ...]
    enclosing: tuple[int, ...]  # ids of the modules whose calls were open around this one
    input_bytes: int = 0  # distinct floating tensor inputs: what a checkpoint of the call keeps
    saved: int = 0
    storages: dict[int, weakref.ref] = field(default_factory=dict)
    op_widths: set[int] = field(default_factory=set)
    conv_widths: set[int] = field(default_factory=set)
    # parameter name -> (grad, input shape, width, kind) per application inside this call
    param_ops: dict[str, list[tuple[bool, tuple[int, ...], int, str]]] = field(default_factory=dict)


@dataclass
class Probe:
    """What the probe run saw.

    Attributes:
        sites: every site, in order of first call (`Site`).
        outputs: the model's output of the probe run (detached).
        one_grad_call: names of modules called 2+ times of which only one call had grad
            (HRM's one-step gradient): nothing to compress across recursion steps.
        modules: site name -> the module object (module sites), or the module whose call
            applies the parameter (parameter sites).
    """

    sites: list[Site]
    outputs: Any
    one_grad_call: list[str]
    modules: dict[str, nn.Module]


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs or ())


def _first_float(tensors: Sequence[Any]) -> torch.Tensor | None:
    return next((t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()),
                None)


class _Recorder(TorchFunctionMode):
    """Module-call stack, saved bytes per call, and parameter use per op."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.stack: list[_Call] = []
        self.calls: dict[int, list[_Call]] = {}
        self.order: list[int] = []
        self.weights = WeightOrigins(model.named_parameters())

    # ---------------------------------------------------------------- module hooks
    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        first = _first_float(leaves)
        widths = tuple(int(t.shape[-1]) for t in leaves if t.is_floating_point() and t.ndim >= 2)
        calls = self.calls.setdefault(id(module), [])
        if not calls:
            self.order.append(id(module))
        storages = {id(t.untyped_storage()): t.untyped_storage().nbytes()
                    for t in leaves if t.is_floating_point()}
        call = _Call(module, len(calls), torch.is_grad_enabled(),
                     None if first is None else tuple(first.shape), widths,
                     tuple(id(c.module) for c in self.stack), sum(storages.values()))
        calls.append(call)
        self.stack.append(call)

    def post(self, module: nn.Module, *_: Any) -> None:
        # always_call hooks run on exceptions too: pop down to this module's call
        while self.stack:
            if self.stack.pop().module is module:
                break

    # ---------------------------------------------------------------- saved tensors
    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if is_weight(t):  # w.t() saved by linear is no activation
            return t
        storage = t.untyped_storage()
        key = id(storage)
        for call in self.stack:
            ref = call.storages.get(key)
            if ref is not None and ref() is storage:
                continue
            call.storages[key] = weakref.ref(storage)
            call.saved += storage.nbytes()
        return t

    # ---------------------------------------------------------------- ops
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not args:
            return out
        if func in _LINEAR or func in _MATMUL or func in _CONV:
            weight = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
            hit = self.weights.origin(weight)
            x = args[0]
            if hit is not None and isinstance(x, torch.Tensor) and x.ndim >= 1:
                if func in _CONV:
                    width, kind = int(x.shape[1] if x.ndim > 1 else x.shape[0]), "conv"
                elif func in _LINEAR:
                    width, kind = int(x.shape[-1]), "linear"
                elif weight.ndim == 2:
                    width, kind = int(weight.shape[0]), "matmul"
                else:
                    return out
                for call in self.stack:
                    (call.conv_widths if kind == "conv" else call.op_widths).add(width)
                if self.stack and kind != "conv":
                    ops = self.stack[-1].param_ops.setdefault(hit, [])
                    ops.append((torch.is_grad_enabled(), tuple(x.shape), width, kind))
        else:
            self.weights.note(func, args, out)
        return out


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _CONV_MODULES):
        return "conv"
    if isinstance(module, nn.RNNCellBase):
        return "rnn_cell"
    return "module"


def run_model(model: nn.Module, args: tuple, kwargs: dict, seed: int = 0) -> Any:
    """Run ``model`` once with grad enabled, seeded, leaving no trace on its state."""
    with isolated(model, devices=cuda_devices(tree_leaves((args, kwargs)))), torch.enable_grad():
        torch.manual_seed(seed)
        return model(*args, **kwargs)


def probe(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> Probe:
    """Run ``model(*args, **kwargs)`` once with grad enabled and record what it shares.

    Args:
        model: the user's model, in the train/eval mode it will be trained in.
        args: positional inputs, as the training loop passes them.
        kwargs: keyword inputs.

    Returns:
        A `Probe`.
    """
    kwargs = dict(kwargs or {})
    rec = _Recorder(model)
    names: dict[int, str] = {}
    for name, m in model.named_modules():
        names.setdefault(id(m), name)
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(rec.pre, with_kwargs=True))
        handles.append(m.register_forward_hook(rec.post, always_call=True))
    try:
        with rec, torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
            out = run_model(model, args, kwargs)
    except Exception as e:
        raise ConfigError(
            f"Running {type(model).__name__} on the example inputs failed during laser_fx's "
            f"probe run: {type(e).__name__}: {e}. Pass example_inputs / example_kwargs exactly "
            "as the training loop calls the model."
        ) from e
    finally:
        for h in handles:
            h.remove()
    outputs = torch.utils._pytree.tree_map(
        lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)
    return _sites_from(rec, names, outputs)


def _sites_from(rec: _Recorder, names: dict[int, str], outputs: Any) -> Probe:
    grad_calls = {mid: sum(c.grad for c in calls) for mid, calls in rec.calls.items()}
    # A parameter-free module called twice (a shared activation) is not weight sharing.
    shared = [mid for mid in rec.order if len(rec.calls[mid]) >= 2 and mid in names
              and next(rec.calls[mid][0].module.parameters(), None) is not None]
    # A block: called with grad 2+ times, and not inside another such module's grad calls.
    def enclosing_block(mid: int) -> int | None:
        for call in rec.calls[mid]:
            for outer in call.enclosing:
                if outer != mid and grad_calls.get(outer, 0) >= 2 and outer in names:
                    return outer
        return None

    outer_of = {mid: enclosing_block(mid) for mid in shared}

    def top(mid: int | None) -> int | None:
        while mid is not None and outer_of.get(mid) is not None:
            mid = outer_of[mid]
        return mid

    shared_set = set(shared)

    def parent_of(mid: int) -> str | None:
        # the innermost other site open around this module's first grad-enabled call
        call = next((c for c in rec.calls[mid] if c.grad), rec.calls[mid][0])
        inner = next((o for o in reversed(call.enclosing) if o in shared_set and o != mid), None)
        return None if inner is None else names[inner]

    sites: list[Site] = []
    modules: dict[str, nn.Module] = {}
    for mid in shared:
        calls = rec.calls[mid]
        module = calls[0].module
        name = names[mid]
        conv_widths = set().union(*(c.conv_widths for c in calls))
        widths = set().union(*(c.op_widths for c in calls)) | conv_widths
        if not conv_widths:  # channels-first inputs: their last dim is spatial, not a width
            for c in calls:
                widths.update(c.input_widths)
        if isinstance(module, nn.Linear):
            widths = {module.in_features}
        uses = tuple(
            Use(step=i, node=f"{name}@{c.index}", grad_enabled=c.grad, call_index=c.index,
                shape=c.shape, nbytes=c.saved if c.grad else None, input_bytes=c.input_bytes)
            for i, c in enumerate(calls)
        )
        block = outer_of[mid]
        width = max(widths) if widths else 0
        sites.append(Site(name, _kind(module), width, uses, widths=tuple(sorted(widths)),
                          block=names[top(block)] if block is not None else None,
                          module_type=type(module).__name__,
                          conv_widths=tuple(sorted(conv_widths)),
                          parent=parent_of(mid) if block is not None else None))
        modules[name] = module
    for site, owner in _param_sites(rec, names, grad_calls, top, outer_of):
        sites.append(site)
        modules[site.name] = owner
    one_grad = [names[mid] for mid in shared if grad_calls[mid] == 1]
    return Probe(sites, outputs, one_grad, modules)


def _param_sites(rec: _Recorder, names: dict[int, str], grad_calls: dict[int, int], top,
                 outer_of) -> list[tuple[Site, nn.Module]]:
    """Parameters that one call of a module applies 2+ times (``X @ W`` in a Python loop)."""
    found: dict[str, list[tuple[_Call, tuple]]] = {}
    for mid in rec.order:
        for call in rec.calls[mid]:
            for param, ops in call.param_ops.items():
                if len(ops) >= 2:
                    found.setdefault(param, []).extend((call, op) for op in ops)
    sites = []
    for param, entries in found.items():
        call = entries[0][0]
        mid = id(call.module)
        block = mid if grad_calls.get(mid, 0) >= 2 else outer_of.get(mid)
        if block is None:
            block = next((o for o in call.enclosing if grad_calls.get(o, 0) >= 2
                          and o in names), None)
        uses = tuple(
            Use(step=i, node=f"{param}@{i}", grad_enabled=op[0], call_index=i, shape=op[1])
            for i, (_, op) in enumerate(entries)
        )
        widths = tuple(sorted({op[2] for _, op in entries}))
        kind = entries[0][1][3]
        sites.append((Site(param, kind, max(widths), uses, param=param, widths=widths,
                           block=names[top(block)] if block is not None else None,
                           module_type=type(call.module).__name__), call.module))
    return sites


def find_sites(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor = (),
    example_kwargs: dict[str, Any] | None = None,
) -> list[Site]:
    """List the weight-shared (looped) sites of a model, from one eager probe run.

    A site is a module called two or more times in one forward (the recursive block, an RNN
    cell, a shared conv or linear layer), or a parameter that one call of a module applies
    two or more times (``X @ W`` in a Python loop). Each `Site` lists its calls in order
    (the recursion steps), whether each ran with grad enabled, the bytes autograd saved
    during each grad-enabled call, and the feature widths inside. A module called
    repeatedly inside another shared block names that block in ``Site.block``. Not sites:
    a matrix tied between two modules that apply it once each (embedding and lm_head).

    The model runs once with grad enabled; buffers, RNG streams, grad mode and train flags
    are restored afterwards. Any Python control flow works (data-dependent loops, ACT
    halting, dataclass carries, einops, casts).

    Args:
        model: the model, in the mode it is trained in.
        example_inputs: positional example inputs, as the training loop passes them.
        example_kwargs: keyword example inputs.

    Returns:
        Sites in order of first call.

    Example::

        for site in laser_fx.find_sites(model, (tokens,)):
            print(site)          # net (TRMNet, width 64): 12 uses, 4 with grad
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"find_sites expects an nn.Module, got {type(model).__name__}.")
    return probe(model, _as_tuple(example_inputs), example_kwargs).sites
