"""`find_sites`: the public face of the site analysis (`passes.find_sites`)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.shape_prop import ShapeProp

from .errors import ConfigError, TraceError
from .passes.find_sites import Site, Use, find_sites_pass
from .tracing import annotate, trace

__all__ = ["Site", "Use", "find_sites"]


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs or ())


def _propagate_shapes(gm: GraphModule, args: tuple, kwargs: dict) -> None:
    """Record activation shapes on an fx-traced graph (exported graphs carry them already)."""
    if any("val" in n.meta for n in gm.graph.nodes if n.op == "call_function"):
        return
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"Example inputs do not match the traced forward: {e}.") from e
    ShapeProp(gm).propagate(*bound.arguments.values())


def find_sites(
    model_or_gm: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor = (),
    example_kwargs: dict[str, Any] | None = None,
) -> list[Site]:
    """List the weight-shared (looped) sites of a model.

    A site is a parameterized op (linear, matmul with a parameter, conv) applied two or more
    times by the same module, or a module called two or more times (``kind="module"``, the
    recursive block). Each `Site` lists its uses in execution order (the recursion step) and
    whether each ran with grad enabled.

    Args:
        model_or_gm: an ``nn.Module`` (traced with `laser_fx.trace`) or a ``GraphModule``.
        example_inputs: positional example inputs; with them, per-use activation shapes and
            bytes are filled in, and a model plain fx cannot trace is captured by export.
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
        was_training = gm.training
        try:
            _propagate_shapes(gm, args, kwargs)
        finally:
            gm.train(was_training)
    return find_sites_pass(gm).record
