"""What benchmarks/compiled.py measures of one step, besides its time: memory (the profiler's
allocation events on a CPU, the caching allocator on CUDA) and the share of the step spent in
compiled graphs. A configuration is anything with ``module`` (its parameters) and ``call``
(runs the model, compiled or not)."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks._common import Workload, sync

__all__ = ["COMPILED_EVENTS", "compiled_share", "cuda_memory", "profiled_memory", "step"]

COMPILED_EVENTS = ("CompiledFunction", "CompiledFunctionBackward", "## Call CompiledFxGraph")
_FWD, _STEP = "compiled_bench::forward", "compiled_bench::step"


def _clear_grads(c: Any) -> None:
    for p in c.module.parameters():
        p.grad = None


def step(w: Workload, c: Any) -> None:
    """One training step of configuration ``c`` (forward, loss, backward; no optimizer)."""
    _clear_grads(c)
    w.loss(w.run(c.call)).backward()


def _walk(events: Sequence[Any]) -> Iterator[Any]:
    for e in events:
        yield e
        yield from _walk(e.children)


def profiled_memory(w: Workload, c: Any) -> tuple[int, int]:
    """``(after_forward, peak)`` bytes of one step, from the profiler's allocation events."""
    _clear_grads(c)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function(_FWD):
            out = w.run(c.call)
            loss = w.loss(out)
            del out
        loss.backward()
    del loss
    tree = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    fwd_end = next(e.end_time_ns for e in tree if e.name == _FWD)
    allocs = sorted((e for e in tree if e.tag == torch._C._profiler._EventType.Allocation),
                    key=lambda e: e.start_time_ns)
    live: dict[int, int] = {}
    now = peak = 0
    after: int | None = None
    for e in allocs:
        if after is None and e.start_time_ns > fwd_end:
            after = now
        a = e.typed[1]
        if a.alloc_size > 0:
            live[a.ptr] = a.alloc_size
            now += a.alloc_size
        elif a.ptr in live:  # frees of storages from before the step are not counted
            now -= live.pop(a.ptr)
        peak = max(peak, now)
    return (now if after is None else after), peak


def cuda_memory(w: Workload, c: Any) -> tuple[int, int]:
    """``(after_forward, peak)`` bytes of one step on a CUDA device: the caching allocator's
    allocated bytes after forward and loss, and its maximum over the step, less what was
    allocated before."""
    _clear_grads(c)
    gc.collect()
    sync(w.target.device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = w.loss(w.run(c.call))
    after = torch.cuda.memory_allocated() - base
    loss.backward()
    del loss
    sync(w.target.device)
    return after, torch.cuda.max_memory_allocated() - base


def compiled_share(w: Workload, c: Any) -> float:
    """Share of one step's wall time spent in compiled graphs (`COMPILED_EVENTS`)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(_STEP):
            step(w, c)
    events = prof.events()
    span = next(e.time_range for e in events if e.name == _STEP)
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.name in COMPILED_EVENTS[:2] or e.name.startswith(COMPILED_EVENTS[2]))
    total, end = 0.0, float("-inf")
    for lo, hi in spans:  # union of (possibly nested) intervals
        total, end = total + max(0.0, hi - max(lo, end)), max(end, hi)
    return total / max(span.end - span.start, 1e-9)
