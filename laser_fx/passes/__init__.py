"""Graph passes. Each pass is a plain function ``(gm, ctx) -> PassResult``.

Analysis passes write only ``node.meta["laser_fx"]``; rewrite passes read it. `run_passes`
lints and recompiles the graph after every pass and re-raises a failure naming the pass and
the passes that ran before it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from ..errors import LaserFxError

__all__ = ["META_KEY", "PassError", "PassResult", "run_passes"]

#: key of laser_fx's per-node analysis results in ``node.meta``
META_KEY = "laser_fx"


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) module, whether it changed, and its findings."""

    graph_module: GraphModule
    modified: bool
    record: Any = None


class PassError(LaserFxError):
    """A pass failed; the message names it and the passes that ran before it."""


@dataclass
class _Ran:
    names: list[str] = field(default_factory=list)


def run_passes(
    gm: GraphModule,
    passes: Sequence[Callable[..., PassResult]],
    *args: Any,
    **kwargs: Any,
) -> tuple[GraphModule, dict[str, PassResult]]:
    """Run ``passes`` in order on ``gm``; every pass gets ``(gm, *args, **kwargs)``.

    Returns:
        The final graph module and each pass's `PassResult`, keyed by pass name.
    """
    ran = _Ran()
    results: dict[str, PassResult] = {}
    for p in passes:
        name = getattr(p, "__name__", repr(p))
        try:
            res = p(gm, *args, **kwargs)
            if not isinstance(res, PassResult):
                raise TypeError(f"pass returned {type(res).__name__}, expected PassResult")
            gm = res.graph_module
            if res.modified:
                gm.graph.lint()
                gm.recompile()
        except LaserFxError as e:
            # Library errors already say what to do; keep their type so callers can catch them.
            e.add_note(f"(in laser_fx pass `{name}`, after {ran.names or 'no passes'})")
            raise
        except Exception as e:
            raise PassError(
                f"laser_fx pass `{name}` failed (passes before it: {ran.names or 'none'}): "
                f"{type(e).__name__}: {e}"
            ) from e
        results[name] = res
        ran.names.append(name)
    return gm, results
