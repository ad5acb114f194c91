"""torch.export capture for `laser_fx.trace` (the path for Hugging Face transformers 5.x).

``torch.export.export(...).module()`` keeps no-grad regions as ``wrap_with_set_grad_enabled``
submodules; ``run_decompositions()`` is never called (it inlines them and the gradient goes
wrong). Export names a module by the path it was reached through; a module listed at several
paths (one layer repeated in a ``ModuleList``) is mapped back to its first name here, so that
its calls group into one site.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

_DD_FX = "symbolically traced variables cannot be used as inputs to control flow"
_DD_EXPORT = ("GuardOnDataDependentSymNode", "data-dependent", "data dependent")


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _is_data_dependent(e: BaseException) -> bool:
    for x in _chain(e):
        text = f"{type(x).__name__} {x}"
        if _DD_FX in text or any(k in text for k in _DD_EXPORT):
            return True
    return False



def _trace_export(model: nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    from torch.export import Dim

    # Dim.AUTO lets export keep every size that the model does not pin symbolic, so the
    # captured module accepts other batch sizes (export specializes sizes 0 and 1).
    def dims(t: Any) -> Any:
        return {i: Dim.AUTO for i in range(t.dim())} if isinstance(t, torch.Tensor) else None

    dynamic = (pytree.tree_map(dims, args), pytree.tree_map(dims, kwargs))
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=_as_dynamic(model, *dynamic))
    except Exception as e:
        if _is_data_dependent(e):
            raise
        ep = torch.export.export(model, args, kwargs)  # static shapes as the last resort
    # Never ep.run_decompositions(): it inlines wrap_with_set_grad_enabled regions.
    gm = ep.module()
    _share_state(model, gm)
    gm._laser_fx_aliases = _alias_map(model, gm)
    _first_names(model, gm)
    return gm


def _first_names(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    """Point each parameter get_attr at the parameter's first name in ``model``.

    Export names a parameter shared by aliased modules after its last alias; sites are named
    after parameters and blocks after modules, so both must use the same (first) name.
    """
    first: dict[int, str] = {}
    for name, p in model.named_parameters():
        first.setdefault(id(p), name)
    changed = False
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            p = gm.get_parameter(node.target)
            name = first.get(id(p))
            if name and name != node.target and gm.get_parameter(name) is p:
                node.target, changed = name, True
        except AttributeError:
            continue
    if changed:
        gm.recompile()


_SLICE = re.compile(r"slice\((-?\d+|None), (-?\d+|None), (-?\d+|None)\)")


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    """The module an export path names; export writes ``layers[:n][i]`` as ``layers.slice(None, n, None).i``."""
    mod: Any = model
    for part in path.split("."):
        sliced = _SLICE.fullmatch(part)
        try:
            if sliced:
                mod = list(mod)[slice(*(None if v == "None" else int(v) for v in sliced.groups()))]
            elif isinstance(mod, list):
                mod = mod[int(part)]
            else:
                mod = getattr(mod, part)
        except (AttributeError, IndexError, TypeError, ValueError):
            return None
    return mod if isinstance(mod, nn.Module) else None


def _alias_map(model: nn.Module, gm: torch.fx.GraphModule) -> dict[str, str]:
    """Map every module path in ``gm``'s stacks to the first name of the module object.

    One module listed R times (``nn.ModuleList([layer] * R)``) is one recursion: export names
    each listing by its own path, so without this its uses look like R unrelated modules.
    """
    first: dict[int, str] = {}
    for name, mod in model.named_modules():  # remove_duplicate: each object's first name
        first.setdefault(id(mod), name)
    out: dict[str, str] = {}
    for sub in gm.modules():
        graph = getattr(sub, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            for value in (node.meta.get("nn_module_stack") or {}).values():
                raw = value[0] if isinstance(value, tuple) else str(value)
                path = raw.removeprefix("L['self']").lstrip(".")
                mod = _module_at(model, path) if path and path not in out else None
                if mod is not None and first.get(id(mod), path) != path:
                    out[path] = first[id(mod)]
    return out


def _as_dynamic(model: nn.Module, args_dims: Any, kwargs_dims: Any) -> Any:
    if not kwargs_dims:
        return args_dims
    # export matches dynamic_shapes to the forward's parameter names
    names = list(inspect.signature(model.forward).parameters)
    spec = dict(zip(names, args_dims, strict=False))
    spec.update(kwargs_dims)
    return spec


def _share_state(model: nn.Module, gm: nn.Module) -> None:
    """Make the exported module hold the model's own parameter and buffer objects."""
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(
        gm.named_buffers(remove_duplicate=False)
    ):
        src = own.get(name)
        if src is not None and src is not t:
            owner, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(owner), attr, src)


