"""Capture a looped model as a `torch.fx.GraphModule` that keeps its autograd behaviour.

Plain `torch.fx.symbolic_trace` runs ``with torch.no_grad():`` blocks at trace time and
records nothing, so the traced module keeps every no-grad region's activations for
backward (pytorch#62043). `trace` records every grad-mode switch as a
``torch._C._set_grad_enabled`` node instead (fx's dead-code elimination keeps it), falls
back to `torch.export` where fx cannot follow the model, checks the capture against the
model on the example inputs, and annotates each node with its module path, call index
and grad mode (`annotate`).
"""

from __future__ import annotations

import os
import re
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ConfigError, TraceError
from .export_capture import _chain, _is_data_dependent, _trace_export

#: key of laser_fx's per-node annotations in ``node.meta``
META_KEY = "laser_fx"

__all__ = ["METHODS", "annotate", "trace"]

#: capture methods `trace` accepts
METHODS = ("auto", "fx", "export")

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)
_RTOL, _ATOL = 1e-5, 1e-6
# GPU kernels accumulate in a run-dependent order (atomic adds in embedding and index
# backward), so two runs of the same graph differ by a few ulps per term summed; a tensor
# also passes when its error is this small relative to its norm. A wrong capture (a missing
# no_grad, a dropped branch) is off by O(1) relative, far above either bound.
_NORM_RTOL = {"cpu": 1e-5, "cuda": 1e-4}


# ---------------------------------------------------------------- grad-mode recording (fx)

_active = threading.local()  # .tracer: the tracer recording in this thread, or None
_gm = torch.autograd.grad_mode
_ORIGINAL = {
    (cls, name): cls.__dict__[name]
    for cls, names in (
        (_gm.no_grad, ("__enter__", "__exit__")),
        (_gm.enable_grad, ("__enter__", "__exit__")),
        (_gm.set_grad_enabled, ("__init__", "__enter__", "__exit__")),
    )
    for name in names
}


def _tracer() -> torch.fx.Tracer | None:
    return getattr(_active, "tracer", None)


def _switch(graph_mode: Any, real_mode: bool) -> None:
    # Record the switch, and mirror it in the real grad mode so that model code reading
    # torch.is_grad_enabled() at trace time sees what it would see in eager.
    _tracer().create_proxy("call_function", torch._C._set_grad_enabled, (graph_mode,), {})
    torch._C._set_grad_enabled(real_mode)


def _enter(ctx: Any, mode: bool) -> None:
    # The mode to restore is read at run time (not frozen at trace time), so the captured
    # module still behaves like eager when it is called under an outer no_grad.
    prev = _tracer().create_proxy("call_function", torch.is_grad_enabled, (), {})
    ctx._lfx_prev = (prev, torch.is_grad_enabled())
    _switch(mode, mode)


def _patched(cls: type, name: str) -> Any:
    original = _ORIGINAL[(cls, name)]

    def hook(self: Any, *args: Any) -> Any:
        if _tracer() is None:  # another thread, or outside the traced forward
            return original(self, *args)
        if name == "__exit__":
            return _switch(*self._lfx_prev)
        if cls is not _gm.set_grad_enabled:
            return _enter(self, cls is _gm.enable_grad)
        if name == "__init__":
            # bool(): a tensor-valued mode is data-dependent; fx raises its own TraceError
            self.mode = bool(args[0])
            _enter(self, self.mode)
            self.prev = self._lfx_prev[1]
        elif torch.is_grad_enabled() != self.mode:  # __enter__ right after __init__: no-op
            _switch(self.mode, self.mode)
        return None

    hook.__name__ = name
    return hook


@contextmanager
def _recording(tracer: torch.fx.Tracer) -> Iterator[None]:
    """Patch the grad-mode classes so that, in this thread, they emit graph nodes."""
    if _tracer() is not None:
        raise TraceError("laser_fx.trace is not re-entrant: a trace is already running here.")
    grad_was = torch.is_grad_enabled()
    for (cls, name) in _ORIGINAL:
        setattr(cls, name, _patched(cls, name))
    _active.tracer = tracer
    torch._C._set_grad_enabled(True)  # a trace describes a call made with grad enabled
    try:
        yield
    finally:
        _active.tracer = None
        for (cls, name), fn in _ORIGINAL.items():
            setattr(cls, name, fn)
        torch._C._set_grad_enabled(grad_was)


class _GradModeTracer(torch.fx.Tracer):
    """fx tracer that records grad-mode switches and traces into every module but leaves."""

    def __init__(self, leaf_modules: Sequence[Any]) -> None:
        super().__init__()
        self._leaf_ids = {id(m) for m in leaf_modules if isinstance(m, nn.Module)}
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # Unlike fx's default, torch.nn built-ins are traced through (F.linear on a get_attr
        # weight), so fx graphs look like exported ones; only the requested leaves stay.
        return (
            id(m) in self._leaf_ids
            or (bool(self._leaf_types) and isinstance(m, self._leaf_types))
            or module_qualified_name in self._leaf_names
        )

    def trace(self, root: Any, concrete_args: Any = None) -> torch.fx.Graph:
        with _recording(self):
            return super().trace(root, concrete_args)


def _trace_fx(model: nn.Module, leaf_modules: Sequence[Any]) -> torch.fx.GraphModule:
    tracer = _GradModeTracer(leaf_modules)
    graph = tracer.trace(model)
    for node in list(graph.nodes):
        # restore points of never-exited set_grad_enabled(...) calls read a mode nobody uses
        if node.op == "call_function" and node.target is torch.is_grad_enabled and not node.users:
            graph.erase_node(node)
    return torch.fx.GraphModule(model, graph, class_name=type(model).__name__)


# ------------------------------------------------------------------------------ annotate


def _parse_stack(stack: dict | None, aliases: dict[str, str], calls: dict) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for key, value in (stack or {}).items():
        path = value[0] if isinstance(value, tuple) else str(value)
        # export uses paths like "L['self'].net"; fx and newer export use "net"
        path = path.removeprefix("L['self']").lstrip(".")
        if path == "":
            continue  # the root module itself: not a call of a submodule
        head, sep, count = str(key).rpartition("@")
        raw = (path, int(count) if sep and count.isdigit() else 0)
        # Calls of one module object under several paths count as calls of its first name,
        # numbered in execution order.
        seen = calls.setdefault(aliases.get(path, path), {})
        out.append((aliases.get(path, path), seen.setdefault(raw, len(seen))))
    return out


def _annotate_graph(gm: nn.Module, grad: bool, aliases: dict[str, str], calls: dict) -> None:
    values: dict[torch.fx.Node, bool] = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.is_grad_enabled:
            values[node] = grad
        elif node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            mode = node.args[0]
            grad = values.get(mode, True) if isinstance(mode, torch.fx.Node) else bool(mode)
        elif node.op == "call_function" and (
            node.target is torch.ops.higher_order.wrap_with_set_grad_enabled
        ):
            sub = getattr(gm, node.args[1].target)
            _annotate_graph(sub, bool(node.args[0]), aliases, calls)
        info = node.meta.setdefault(META_KEY, {})
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_module" and type(getattr(gm, node.target, None)).__name__ == "GuardsFn":
            stack = None  # export's input-shape guard copies a stranger's module stack
        info["module_stack"] = _parse_stack(stack, aliases, calls)
        info["grad_enabled"] = grad


def annotate(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Write module path, call index and grad mode into every node's ``meta["laser_fx"]``.

    ``meta["laser_fx"]["module_stack"]`` is ``[(module_path, call_index), ...]``, outermost
    first, without the root; ``call_index`` counts the calls of that module path (0 for the
    first). ``meta["laser_fx"]["grad_enabled"]`` is the grad mode the node runs under,
    assuming the module is called with grad enabled (for a switch node: the mode after it).
    Nodes inside exported ``wrap_with_set_grad_enabled`` submodules are annotated too.
    Other keys in ``meta["laser_fx"]`` are kept, so running it twice changes nothing.

    Args:
        gm: a graph module from `trace` (fx or export).

    Returns:
        ``gm``, annotated in place.
    """
    _annotate_graph(gm, True, dict(getattr(gm, "_laser_fx_aliases", {})), {})
    return gm


# ---------------------------------------------------------------------------- verification


def _clone_inputs(tree: Any) -> Any:
    def clone(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return t.detach().clone().requires_grad_(t.requires_grad)
        return t

    return pytree.tree_map(clone, tree)


def _run(fn: nn.Module, args: tuple, kwargs: dict, params: list, seed: int, devices: list):
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        torch.manual_seed(seed)  # same dropout masks in both runs; the caller's RNG is kept
        out = fn(*_clone_inputs(args), **_clone_inputs(kwargs))
    leaves = pytree.tree_leaves(out)
    floats = [o for o in leaves if isinstance(o, torch.Tensor) and o.is_floating_point()]
    loss = sum((o.sum() for o in floats if o.requires_grad), start=torch.zeros(()))
    grads: list = [None] * len(params)
    if loss.requires_grad and params:
        grads = list(torch.autograd.grad(loss, params, allow_unused=True))
    return leaves, grads


def _mismatch(a: Any, b: Any) -> str | None:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return f"shape {tuple(b.shape)} != {tuple(a.shape)}"
        a, b = a.double(), b.double()
        if torch.allclose(a, b, rtol=_RTOL, atol=_ATOL, equal_nan=True):
            return None
        finite = torch.isfinite(a) & torch.isfinite(b)
        odd_a, odd_b = a[~finite], b[~finite]  # inf/nan: must agree exactly
        same_odd = torch.equal(odd_a.isnan(), odd_b.isnan()) and torch.equal(
            odd_a.nan_to_num(), odd_b.nan_to_num())
        diff = torch.where(finite, a - b, 0.0)
        rel = (diff.norm() / torch.where(finite, a, 0.0).norm().clamp_min(_ATOL)).item()
        if same_odd and rel <= _NORM_RTOL.get(a.device.type, _NORM_RTOL["cuda"]):
            return None
        return (f"max abs diff {diff.abs().max().item():.3e}, relative error {rel:.1e}"
                + ("" if same_odd else ", inf/nan at different places"))
    return None if type(a) is type(b) and a == b else f"{b!r} != {a!r}"


def _verify(model: nn.Module, gm: nn.Module, args: tuple, kwargs: dict, how: str) -> None:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    bufs = [b for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in pytree.tree_leaves((args, kwargs, params))
                      if isinstance(t, torch.Tensor) and t.device.type == "cuda"})
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    # Run the model, then roll stateful buffers (e.g. BatchNorm statistics) back so both
    # runs start from the same state and the model ends up updated once.
    before = [b.detach().clone() for b in bufs]
    ref, ref_grads = _run(model, args, kwargs, params, seed, devices)
    after = [b.detach().clone() for b in bufs]
    with torch.no_grad():
        for b, v in zip(bufs, before, strict=True):
            b.copy_(v)
    got, got_grads = _run(gm, args, kwargs, params, seed, devices)
    problems = []
    if len(ref) != len(got):
        problems.append(f"{len(got)} outputs, expected {len(ref)}")
    for i, (a, b) in enumerate(zip(ref, got, strict=False)):
        if (m := _mismatch(a, b)) is not None:
            problems.append(f"output {i}: {m}")
    for (name, p), a, b in zip(named, ref_grads, got_grads, strict=True):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        if (m := _mismatch(a, b)) is not None:
            problems.append(f"gradient of `{name}`: {m}")
    for i, (b, v) in enumerate(zip(bufs, after, strict=True)):
        if (m := _mismatch(v, b.detach())) is not None:
            problems.append(f"buffer {i} after the call: {m}")
    if problems:
        raise TraceError(
            f"The {how} capture of {type(model).__name__} does not match the model on the "
            f"example inputs (elementwise rtol={_RTOL}, atol={_ATOL}, or relative norm error"
            f" {_NORM_RTOL}): " + "; ".join(problems[:5])
            + ". laser_fx refuses a capture that computes something else; pass leaf_modules= "
            "for the modules that cannot be traced through, or compress a submodule instead."
        )


# ------------------------------------------------------------------------------ errors


def _user_line(e: BaseException) -> str:
    """The innermost traceback frame outside torch and laser_fx: where the model did it."""
    found = ""
    for x in reversed(_chain(e)):
        for fr in traceback.extract_tb(x.__traceback__):
            fname = os.path.abspath(fr.filename)
            if not fname.startswith(_TORCH_DIR) and fname != _THIS_FILE and "<eval_with_key>" not in fname:
                found = f" at {fr.filename}:{fr.lineno} (`{(fr.line or '').strip()}`)"
    return found


def _output_hint(model: nn.Module, e: BaseException) -> str:
    """What to do when export cannot flatten an output (a Hugging Face KV cache, say)."""
    for x in _chain(e):
        found = re.search(r"Found <class '([\w.]+)'> in output", str(x))
        if found is None:
            continue
        cls = found.group(1).rpartition(".")[2]
        if "Cache" in cls or getattr(getattr(model, "config", None), "use_cache", False):
            return (
                f" Cause: the model returns a {cls} (its key/value cache), which cannot be "
                "captured. Fix: build the model with `use_cache=False` "
                "(model.config.use_cache = False) or pass use_cache=False in example_kwargs "
                "and in every call; training needs no cache."
            )
        return (
            f" Cause: the model returns a {cls}, which torch.export cannot flatten. Fix: "
            "return tensors (or tuples/dicts of them), or register the class with "
            "torch.utils._pytree.register_pytree_node."
        )
    return ""


def _data_dependent_error(model: nn.Module, e: BaseException, how: str) -> TraceError:
    children = [n for n, _ in model.named_children()]
    body = f"model.{children[0]}" if len(children) == 1 else "model.<loop body>"
    hint = f" (submodules: {', '.join(children)})" if len(children) > 1 else ""
    return TraceError(
        f"{type(model).__name__} has data-dependent control flow{_user_line(e)}: a Python "
        f"`if`/`while`/`break` decided by a tensor's value cannot be captured as one graph "
        f"({how}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
        f"Compress the loop body module instead: laser_fx.compress({body}, ...){hint}."
    )


# --------------------------------------------------------------------------------- trace


def trace(
    model: nn.Module,
    example_inputs: tuple = (),
    example_kwargs: dict | None = None,
    *,
    method: str = "auto",
    leaf_modules: Sequence[nn.Module | type | str] = (),
) -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule whose forward and autograd behaviour equal its own.

    Args:
        model: the module to capture; the result shares its parameters and buffers.
        example_inputs: positional inputs; with them (or ``example_kwargs``) the capture is
            run beside the model, and outputs and parameter gradients must match.
        example_kwargs: keyword inputs.
        method: ``"fx"`` (grad-mode-recording symbolic trace), ``"export"``
            (`torch.export`, needs example inputs) or ``"auto"`` (fx, then export).
        leaf_modules: modules (instances, types or qualified names) kept as ``call_module``
            nodes by the fx tracer; every other module is traced through.

    Returns:
        The annotated `torch.fx.GraphModule`; ``gm._laser_fx_trace`` records
        ``{"method": "fx" | "export", "leaf_modules": [...]}``.

    Example::

        gm = laser_fx.trace(model, (tokens,))
    """
    if not isinstance(model, nn.Module):
        raise TraceError(
            f"laser_fx.trace needs an nn.Module, got {type(model).__name__}; wrap a function "
            "in a Module whose forward calls it."
        )
    if method not in METHODS:
        raise ConfigError(f"`method` must be one of {METHODS}, got {method!r}.")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)  # a lone tensor is the common slip
    kwargs = dict(example_kwargs or {})
    have_inputs = bool(example_inputs) or bool(kwargs)
    leaves = list(leaf_modules)
    if method == "export" and not have_inputs:
        raise ConfigError("method='export' needs example_inputs (or example_kwargs).")
    if method == "export" and leaves:
        raise ConfigError("`leaf_modules` is an fx option; torch.export traces every module.")

    errors: list[str] = []
    if method in ("auto", "fx"):
        try:
            gm = _trace_fx(model, leaves)
            if have_inputs:
                _verify(model, gm, example_inputs, kwargs, "fx")
            return _finish(gm, "fx", leaves)
        except TraceError as e:
            if method == "fx" or not have_inputs:
                raise
            errors.append(f"fx: {e}")
            fx_error: BaseException = e
        except Exception as e:
            if _is_data_dependent(e) and (method == "fx" or not have_inputs):
                raise _data_dependent_error(model, e, "torch.fx") from e
            if method == "fx":
                raise TraceError(f"torch.fx could not trace {type(model).__name__}: "
                                 f"{type(e).__name__}: {e}") from e
            if not have_inputs:
                raise TraceError(
                    f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: "
                    f"{e}){_user_line(e)}. Pass example_inputs so that laser_fx.trace can "
                    "fall back to torch.export."
                ) from e
            errors.append(f"fx: {type(e).__name__}: {e}")
            fx_error = e
        if leaves:
            raise TraceError(
                f"torch.fx could not capture {type(model).__name__} ({errors[0]}) and "
                "torch.export cannot keep `leaf_modules`; drop them or fix the fx failure."
            ) from fx_error
    try:
        gm = _trace_export(model, example_inputs, kwargs)
        _verify(model, gm, example_inputs, kwargs, "torch.export")
        return _finish(gm, "export", [])
    except TraceError as e:
        errors.append(f"export: {e}")
        raise TraceError(f"No capture of {type(model).__name__} matches it: "
                         + " | ".join(errors)) from e
    except Exception as e:
        if _is_data_dependent(e):
            raise _data_dependent_error(model, e, "torch.export") from e
        errors.append(f"export: {type(e).__name__}: {str(e)[:500]}")
        raise TraceError(f"Could not capture {type(model).__name__}.{_output_hint(model, e)} "
                         "Details: " + " | ".join(errors)) from e


def _finish(gm: torch.fx.GraphModule, how: str, leaves: list) -> torch.fx.GraphModule:
    gm._laser_fx_trace = {"method": how, "leaf_modules": leaves}
    return annotate(gm)
