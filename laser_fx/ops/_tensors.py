"""Finding tensors: inside arguments pytree does not open, and in a re-run's graph."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import LaserFxError

__all__ = ["check_declared", "hidden_grad_tensors", "undeclared_leaves", "walk_tensors"]


def walk_tensors(obj: Any, path: str = "", depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor inside ``obj``: in lists, tuples, mappings,
    dataclasses and the attributes of plain objects (a cache object), 6 levels deep."""
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from walk_tensors(getattr(obj, f.name, None), f"{path}.{f.name}", depth + 1)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from walk_tensors(v, f"{path}[{k!r}]", depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk_tensors(v, f"{path}[{i}]", depth + 1)
    elif not isinstance(obj, (type, nn.Module)) and isinstance(getattr(obj, "__dict__", None), dict):
        for k, v in vars(obj).items():
            yield from walk_tensors(v, f"{path}.{k}", depth + 1)


def hidden_grad_tensors(obj: Any) -> list[str]:
    """Paths of tensors requiring grad inside ``obj``, an argument pytree does not open.

    A compressed checkpoint sees only the tensors pytree flattens out of its arguments; a
    tensor that requires grad inside another container would lose its gradient silently.
    """
    return [p for p, t in walk_tensors(obj) if t.requires_grad]


def undeclared_leaves(roots: Sequence[torch.Tensor],
                       declared: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Leaves requiring grad that the re-run reaches but that are not Function inputs.

    A declared tensor that is not a leaf (``params=[w]`` with ``w = base.t()``) ends the walk
    where the graph reaches it: its gradient is returned, and autograd carries it on.
    """
    allowed = {id(t) for t in declared}
    ends = {(id(t.grad_fn), t.output_nr) for t in declared if t.grad_fn is not None}
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    while stack and len(found) < 4:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None:
            if id(var) not in allowed:
                found.append(var)
            continue
        stack.extend(n for n, nr in node.next_functions if (id(n), nr) not in ends)
    return found


def check_declared(name: str, roots: Sequence[torch.Tensor],
                   declared: Sequence[torch.Tensor]) -> None:
    """Raise if the re-run of block ``name`` reaches a tensor requiring grad that is neither
    one of its inputs nor a parameter (`undeclared_leaves`): its gradient would be lost."""
    stray = undeclared_leaves(roots, declared)
    if stray:
        shapes = ", ".join(str(tuple(t.shape)) for t in stray)
        raise LaserFxError(
            f"The checkpointed block {name} reads tensors that require grad but are neither "
            f"its inputs nor its parameters (shapes {shapes}); their gradients would be lost. "
            "Pass them to the block as arguments, or with `params=[...]`; a cache of an "
            "earlier call (Hugging Face use_cache=True) does this: build the model with "
            "use_cache=False."
        )
