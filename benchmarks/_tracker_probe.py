"""`TrackerProbe`: what the trackers do inside a measured step (benchmarks/tracker_share.py).

While entered it times the trackers' public methods, counts host reads (inside tracker
methods and over the whole step), records the shape of every stored record, sorts the
decisions that found a basis short by whether they were about a tracker's first call of the
step or a later one (with an optimizer step between steps, the first call is the first one
after the weights moved), and counts the bases built or refined with values read back at
once (each a synchronising read on an accelerator).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from laser_fx._basis import BasisUpdates
from laser_fx._decisions import LateDecisions
from laser_fx.tracker import SubspaceTracker

__all__ = ["AT_ONCE", "HOST_READS", "PHASES", "TIMED", "TrackerProbe", "is_dense"]

#: tracker methods timed (those the class has)
TIMED = ("compress", "decompress", "settle", "end_forward")
#: basis updates that read values back at once (a refinement taken whole, a reset, a first
#: basis); outermost calls are counted (`TrackerProbe.at_once`)
AT_ONCE = ("_refine", "_reset", "_first")
#: tensor methods that copy a value back to the host
HOST_READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist")
#: what a tracker spends its time on (``phases=True``): the steady state's projection (centering,
#: ``X Q``, captured energies), the reconstruction for backward (``C Qᵀ``, plus a decision
#: still open), and building or refining bases (first bases, power updates, resets, either
#: half of a split refinement). A phase called inside another one is counted in the inner
#: one only; the rest of a tracker call (decisions, storing records, centering again for a
#: refinement) is ``"other"``.
PHASES = {"projection": ("_project",), "reconstruction": ("decompress",),
          "refinement": ("_first", "_refine", "_reset", "_power_start", "_power_finish")}
_OTHER = "other"
_MISSING = object()


class TrackerProbe:
    """While entered: times tracker methods, counts host reads, records compress shapes.

    Patches the methods of `TIMED` that `SubspaceTracker` (and subclasses defining their own)
    has, and the `HOST_READS` methods of ``torch.Tensor``; exiting puts the originals back.
    Only the outermost tracker call is timed, so nested calls (``settle`` calling
    ``compress``) count once; every compress call's record shape is kept. On a CPU a call's
    time is wall time; on a CUDA device it is the device time between two CUDA events
    recorded around the call, read when `seconds` is read: no synchronisation around the
    calls, so the step's kernels overlap as they do unmeasured (host work that leaves the
    device idle inside a call, a host read for one, counts; host work hidden behind queued
    kernels does not).

    Attributes:
        seconds: time inside tracker methods since `begin` (see above).
        by_tracker: the same per tracker (``id(tracker) -> seconds``).
        host_reads: host reads made inside a tracker method since `begin`.
        all_reads: host reads made anywhere while entered, since `begin`.
        calls: outermost tracker method calls by name, since `begin`.
        records: what each compress call returned since `begin` (kept until the next
            `begin`, so that `shapes` and `dense` see a record revised after its call).
        first_refines: decisions since `begin` that found a tracker's basis short (a
            refinement: power update or reset) at the tracker's first decision since
            `begin`, i.e. about its first call of the step (after the optimizer step);
        later_refines: the same at the tracker's later decisions (along the recursion).
        at_once: refinements, resets and first bases built with values read back at once
            (`AT_ONCE`; on an accelerator each waits for the device: a refinement split
            into a queued power iteration and a later Ritz step is not one).
        phases: with ``phases=True``, `seconds` split by `PHASES` (plus ``"other"``), each
            moment of a tracker call counted in the innermost phase running then; on CUDA
            from events recorded at every phase change.

    Example::

        probe = TrackerProbe()
        with probe:
            loss_fn(model(x)).backward()
        print(probe.seconds, probe.host_reads, probe.shapes)
    """

    def __init__(self, device: str = "cpu", *, phases: bool = False) -> None:
        self.device = device
        self._cuda = torch.device(device).type == "cuda"
        self._phased = phases
        self._stack: list[str] = []  # phases running, innermost last
        self._depth = 0
        self._reading = False
        self._saved: list[tuple[type, str, Any]] = []
        self.begin()

    def begin(self) -> None:
        """Zero the counts (call before each measured step)."""
        self._seconds = 0.0
        self._by_tracker: Counter[int] = Counter()
        # CUDA: (id(tracker), start, end) of each timed call
        self._events: list[tuple[int, Any, Any]] = []
        self.host_reads = 0
        self.all_reads = 0
        self.calls: Counter[str] = Counter()
        self.records: list[Any] = []
        self.first_refines = 0
        self.later_refines = 0
        self.at_once = 0
        self._decided: set[int] = set()
        self._building = 0
        self._phase_seconds: Counter[str] = Counter()
        # (clock or CUDA event, innermost phase from then on; None: outside the trackers)
        self._changes: list[tuple[Any, str | None]] = []

    @property
    def seconds(self) -> float:
        """Time inside tracker methods since `begin` (on CUDA: waits for the device)."""
        self._read_events()
        return self._seconds

    @property
    def by_tracker(self) -> dict[int, float]:
        """`seconds` per tracker: ``id(tracker) -> seconds`` (on CUDA: waits for the device)."""
        self._read_events()
        return dict(self._by_tracker)

    @property
    def phases(self) -> dict[str, float]:
        """`seconds` by phase (`PHASES` and ``"other"``; on CUDA: waits for the device)."""
        if self._changes and self._cuda:
            torch.cuda.synchronize()
        for (at, phase), (until, _) in zip(self._changes, self._changes[1:], strict=False):
            if phase is not None:
                self._phase_seconds[phase] += (at.elapsed_time(until) / 1e3 if self._cuda
                                               else until - at)
        del self._changes[:-1]  # the last change starts the interval still open
        return {p: self._phase_seconds[p] for p in (*PHASES, _OTHER)}

    def _enter(self, phase: str) -> None:
        self._stack.append(phase)
        self._changes.append((self._clock(), phase))

    def _leave(self) -> None:
        self._stack.pop()
        self._changes.append((self._clock(), self._stack[-1] if self._stack else None))

    def _clock(self) -> Any:
        return self._mark() if self._cuda else time.perf_counter()

    def _read_events(self) -> None:
        if self._events:
            torch.cuda.synchronize()
            for key, a, b in self._events:
                dt = a.elapsed_time(b) / 1e3
                self._seconds += dt
                self._by_tracker[key] += dt
            self._events.clear()

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """``(N, width, k)`` of each record stored as coefficients."""
        out = []
        for p in self.records:
            if not is_dense(p):
                width, k = p.basis.shape[-2], p.basis.shape[-1]
                out.append((p.coeffs.numel() // max(p.coeffs.shape[-1], 1), width, k))
        return [(int(n), int(w), int(k)) for n, w, k in out]

    @property
    def dense(self) -> int:
        """Records stored dense (their ideal cost is 0)."""
        return sum(map(is_dense, self.records))

    # ------------------------------------------------------------------ patching
    def _patch(self, cls: type, name: str, make: Callable[[Any], Any]) -> None:
        own = cls.__dict__.get(name, _MISSING)
        self._saved.append((cls, name, own))
        setattr(cls, name, make(getattr(cls, name)))

    def __enter__(self) -> TrackerProbe:
        if self._saved:
            raise RuntimeError("TrackerProbe is already entered; it does not nest.")
        if self._phased:  # first: a timed public method runs its phase inside its call
            for phase, names in PHASES.items():
                for name in names:
                    owner = next(c for c in (SubspaceTracker, BasisUpdates, LateDecisions)
                                 if name in c.__dict__)
                    self._patch(owner, name, lambda fn, phase=phase: self._in_phase(phase, fn))
        classes = [SubspaceTracker]
        for cls in classes:  # subclasses overriding a method get theirs wrapped too
            classes.extend(c for c in cls.__subclasses__() if c not in classes)
        for cls in classes:
            for name in TIMED:
                if (name in cls.__dict__ if cls is not SubspaceTracker
                        else hasattr(cls, name)):
                    self._patch(cls, name, lambda fn, name=name: self._timed(name, fn))
        self._patch(LateDecisions, "_decide", self._decision)
        for name in AT_ONCE:
            self._patch(BasisUpdates if hasattr(BasisUpdates, name) else SubspaceTracker, name,
                        self._built)
        for name in HOST_READS:
            self._patch(torch.Tensor, name, self._counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, name, own in reversed(self._saved):
            if own is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, own)
        self._saved.clear()
        self._depth = 0

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(tracker: Any, *args: Any, **kwargs: Any) -> Any:
            if self._depth:  # inside an outer tracker call: its time is already counted
                self._depth += 1
                try:
                    out = fn(tracker, *args, **kwargs)
                finally:
                    self._depth -= 1
            else:
                start = self._mark()
                t0 = time.perf_counter()
                self._depth = 1
                if self._phased:
                    self._enter(_OTHER)
                try:
                    out = fn(tracker, *args, **kwargs)
                finally:
                    self._depth = 0
                    if self._phased:
                        self._leave()
                    if start is None:
                        dt = time.perf_counter() - t0
                        self._seconds += dt
                        self._by_tracker[id(tracker)] += dt
                    else:
                        self._events.append((id(tracker), start, self._mark()))
                self.calls[name] += 1
            if name == "compress":
                self.records.append(out)
            return out

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def _in_phase(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            self._enter(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self._leave()

        run.__wrapped__ = fn  # type: ignore[attr-defined]
        return run

    def _mark(self) -> Any:
        """A recorded CUDA event on a CUDA device, else None (the wall clock is read)."""
        if not self._cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _decision(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def decide(tracker: Any, *args: Any, **kwargs: Any) -> Any:
            before = tracker.revisions  # +1 for a decision that found the basis short
            out = fn(tracker, *args, **kwargs)
            refined = tracker.revisions - before
            if id(tracker) in self._decided:
                self.later_refines += refined
            else:
                self._decided.add(id(tracker))
                self.first_refines += refined
            return out

        decide.__wrapped__ = fn  # type: ignore[attr-defined]
        return decide

    def _built(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def build(tracker: Any, *args: Any, **kwargs: Any) -> Any:
            self.at_once += self._building == 0  # a reset inside a refinement counts once
            self._building += 1
            try:
                return fn(tracker, *args, **kwargs)
            finally:
                self._building -= 1

        build.__wrapped__ = fn  # type: ignore[attr-defined]
        return build

    def _counted(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def read(t: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._reading:  # a read implemented by another read counts once
                return fn(t, *args, **kwargs)
            self._reading = True
            try:
                self.all_reads += 1
                self.host_reads += self._depth > 0
                return fn(t, *args, **kwargs)
            finally:
                self._reading = False

        return read


def is_dense(packed: Any) -> bool:
    """Whether a record is stored as it is (no coefficients in a basis): its ideal cost is 0."""
    return (getattr(packed, "coeffs", None) is None or getattr(packed, "basis", None) is None
            or getattr(packed, "dense", None) is not None)
