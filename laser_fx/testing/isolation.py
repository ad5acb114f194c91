"""A model's own dynamo state, for comparing compiled variants of one model in one process.

Dynamo keys compiled code, and its "skip this frame" marks, by code object: deep copies of one
model share theirs. A variant that graph-breaks inside a loop (laser_fx region mode in TRM's
recursion) makes dynamo skip that loop's function for every copy, compiled ones included, so
the others run their loop eagerly. `own_code` gives a model's classes fresh code objects;
`entry` gives a compiled call its own top-level code object.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["entry", "own_code"]


def entry(module: nn.Module, key: str) -> Callable[..., Any]:
    """``module``'s call through a function whose code object is its own: dynamo keys
    compiled code by code object, and its guards tell neither deep copies of one model nor
    a functorch config (``activation_memory_budget``) apart, so configurations compiled
    through one function would share graphs."""
    def run(*args: Any, **kwargs: Any) -> Any:
        return module(*args, **kwargs)

    run.__code__ = run.__code__.replace(co_name="run_" + key.replace(".", "_").replace("-", "_"))
    return run


def own_code(model: nn.Module) -> nn.Module:
    """``model`` with each of its modules of a class of yours (not torch's or laser_fx's)
    moved to a subclass holding fresh copies of the class's functions (new code objects, same
    behaviour), so that dynamo's per-code-object state (compiled entries, "skip this frame"
    marks) is this model's alone. One subclass per class; returns ``model``."""
    clones: dict[type, type] = {}

    def yours(cls: type) -> bool:
        return cls.__module__.split(".")[0] not in ("torch", "laser_fx", "builtins")

    for module in model.modules():
        cls = type(module)
        if not yours(cls):
            continue
        if cls not in clones:
            fresh: dict[str, Any] = {}
            for klass in cls.__mro__:
                if not yours(klass):
                    continue
                for name, fn in vars(klass).items():
                    if isinstance(fn, types.FunctionType) and name not in fresh:
                        copy_ = types.FunctionType(fn.__code__.replace(), fn.__globals__, name,
                                                   fn.__defaults__, fn.__closure__)
                        copy_.__kwdefaults__ = fn.__kwdefaults__
                        copy_.__qualname__, copy_.__doc__ = fn.__qualname__, fn.__doc__
                        fresh[name] = copy_
            clones[cls] = type(cls.__name__, (cls,), {**fresh, "__module__": cls.__module__})
        module.__class__ = clones[cls]
    return model
