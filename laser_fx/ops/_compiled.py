"""What laser_fx's custom ops inside a compiled graph share: sites named by integer keys,
call roles read while dynamo traces, and records named by tokens.

A compiled graph cannot hold a Python object, so a site's ops name it by an integer key
(`register_site`), and what a forward op stores for its backward op is a record in
`RECORDS`, named by a token: a 0-d CPU int64 tensor the graph saves for backward. A record
lives as long as its token (`new_token`): a graph that is freed, or backpropagated without
``retain_graph``, frees its records.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
from torch import Tensor

from ..errors import LaserFxError

__all__ = ["RECORDS", "TOKENS", "call_op", "new_token", "record_of", "register_site", "site",
           "traced_role"]

#: ``op key -> weakref(SiteWrapper)``; a key is a constant in the compiled graph
_SITES: dict[int, weakref.ref] = {}
_KEYS = itertools.count(1)
#: ``token id -> record``; an entry lives as long as its token tensor
RECORDS: dict[int, Any] = {}
#: token ids, in order of creation (tests count the ops a step ran with it)
TOKENS = itertools.count(1)


def register_site(wrapper: Any) -> int:
    """A new op key for ``wrapper`` (held weakly: a deleted model frees its entry)."""
    key = next(_KEYS)
    _SITES[key] = weakref.ref(wrapper, lambda _, key=key: _SITES.pop(key, None))
    return key


def site(key: int) -> Any:
    """The `SiteWrapper` of op key ``key``."""
    ref = _SITES.get(key)
    wrapper = None if ref is None else ref()
    if wrapper is None:
        raise LaserFxError(
            f"internal: a compiled graph calls laser_fx site {key}, whose model no longer "
            "exists; compile the model again after compressing it."
        )
    return wrapper


@torch._dynamo.assume_constant_result
def traced_role(key: int) -> int:
    """The role (`SiteWrapper.role_of`) of the call dynamo is tracing: its call site read
    from dynamo's translators (one per frame being traced), since the Python stack inside
    a compiled graph shows no user lines. Run by dynamo at trace time; a constant of the
    graph."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    from ..wrapper import call_site

    wrapper = site(key)
    frames = []
    try:  # dynamo internals: if they change, calls share one role (bases, not correctness)
        tx = InstructionTranslator.current_tx().output.current_tx  # innermost (inlined)
        while tx is not None:
            frames.append((tx.f_code.co_filename, tx.lineno, tx.f_code.co_firstlineno))
            tx = tx.parent
    except AttributeError:
        frames = []
    return wrapper.role_of(call_site(wrapper.root, frames))


def new_token(record: Any) -> Tensor:
    """A token naming ``record`` (kept in `RECORDS` while the token lives)."""
    token_id = next(TOKENS)
    token = torch.tensor(token_id, dtype=torch.int64)
    RECORDS[token_id] = record
    weakref.finalize(token, RECORDS.pop, token_id, None)
    return token


def record_of(token: Tensor, name: str) -> Any:
    """The record ``token`` names; a clear error when its graph let it go."""
    record = RECORDS.get(int(token))
    if record is None:
        raise LaserFxError(
            f"The compressed record of {name} is gone at this backward: its graph was "
            "already backpropagated (use retain_graph=True to backpropagate twice) or freed."
        )
    return record


def call_op(func: Any, args: tuple, kwargs: dict) -> Any:
    """``func(*args, **kwargs)`` from a `TorchFunctionMode` that dynamo may be tracing:
    Tensor's methods written in Python (``unflatten``, ``split``, ...) call ``super()``,
    which dynamo cannot follow from a mode; called as methods, dynamo knows them."""
    if (torch.compiler.is_compiling() and getattr(func, "__module__", None) == "torch._tensor"
            and args and isinstance(args[0], Tensor)):
        return getattr(args[0], func.__name__)(*args[1:], **kwargs)
    return func(*args, **kwargs)
