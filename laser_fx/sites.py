"""`find_sites`: the public face of the site analysis (`passes.find_sites`)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils import _pytree as pytree

from .errors import ConfigError, TraceError
from .passes.find_sites import _WRAP_GRAD, Site, Use, find_sites_pass
from .tracing import annotate, trace

__all__ = ["Site", "Use", "find_sites"]


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs or ())


class _ShapeRecorder(Interpreter):
    """Runs the graph once and writes each node's output ``tensor_meta`` (as `ShapeProp` does).

    Unlike `ShapeProp` it also steps into the ``wrap_with_set_grad_enabled`` submodules of an
    exported graph, whose nodes carry only symbolic ``val`` sizes, under the grad mode the
    region sets.
    """

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor) and obj.layout is torch.strided:
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        return result

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if _WRAP_GRAD is not None and target is _WRAP_GRAD:
            mode, sub, *operands = args
            with torch.set_grad_enabled(bool(mode)):
                return _ShapeRecorder(sub).run(*operands, enable_io_processing=False)
        return super().call_function(target, args, kwargs)


def _propagate_shapes(gm: GraphModule, args: tuple, kwargs: dict) -> None:
    """Record the activation shape of every node of ``gm`` on the example inputs.

    The graph runs once under ``no_grad`` (regions the model switches to grad mode still
    switch); the caller's RNG and the module's buffers (BatchNorm statistics) are restored
    afterwards, so the analysis has no side effect on the model.

    Args:
        gm: a graph module from `laser_fx.trace` (fx or export).
        args: positional example inputs.
        kwargs: keyword example inputs.
    """
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(
            f"Example inputs do not match the traced forward{inspect.signature(gm.forward)}: "
            f"{e}. Pass the same inputs the model is called with."
        ) from e
    # The graph's placeholders follow the forward's parameters in order.
    bound.apply_defaults()
    flat = pytree.tree_leaves((args, kwargs))
    devices = sorted({
        t.device.index or 0 for t in flat if isinstance(t, torch.Tensor) and t.is_cuda
    })
    buffers = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            _ShapeRecorder(gm).run(*bound.arguments.values())
    except Exception as e:
        raise TraceError(
            f"Running the captured {type(gm).__name__} on the example inputs failed while "
            f"recording activation shapes: {type(e).__name__}: {e}. Check that the example "
            "inputs are the ones the model is called with."
        ) from e
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def find_sites(
    model_or_gm: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor = (),
    example_kwargs: dict[str, Any] | None = None,
) -> list[Site]:
    """List the weight-shared (looped) sites of a model.

    A site is a parameterized op (linear, ``X @ W`` with a parameter ``W`` on the right,
    conv) applied two or more times by the same module, or a module called two or more times
    (``kind="module"``, the recursive block). Each `Site` lists its uses in execution order
    (the recursion step) and whether each ran with grad enabled. Not sites: a matrix tied
    between two modules that apply it once each (embedding and lm_head), and ``W @ X`` (the
    ``X`` it saves has the width on its first axis; trackers compress along the last).

    Args:
        model_or_gm: an ``nn.Module`` (traced with `laser_fx.trace`) or a ``GraphModule``
            from `laser_fx.trace` (fx or export), analysed in place (``node.meta``).
        example_inputs: positional example inputs; with them, per-use activation shapes and
            bytes are filled in (the graph runs once, without side effects on RNG or
            buffers), and a model plain fx cannot trace is captured by export. Without them
            shapes are None, except those a graph module already recorded.
        example_kwargs: keyword example inputs.

    Returns:
        Op sites in order of first use, then module sites.

    Example::

        for site in laser_fx.find_sites(model, (tokens,)):
            print(site)          # net.blocks.0.mlp.gate (linear, width 128): 21 uses, 7 with grad
    """
    args, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    if isinstance(model_or_gm, GraphModule):
        gm = model_or_gm
        annotate(gm)
    elif isinstance(model_or_gm, nn.Module):
        gm = trace(model_or_gm, args, kwargs or None)
    else:
        raise TraceError(
            f"find_sites expects an nn.Module or a GraphModule, got {type(model_or_gm).__name__}."
        )
    if args or kwargs:
        _propagate_shapes(gm, args, kwargs)
    return find_sites_pass(gm).record
