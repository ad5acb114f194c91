"""Tracker share: what the trackers cost in an eager training step, against their ideal.

Issue 15's eager must-show, measured: "tracker time <= 2x its ideal (the projections alone) in
every mode; tracker share of the step <= 2% (auto), <= 10% (region), <= 5% (linear) at
D >= 128". For each width D, the TRM attention model (examples/trm, random init, batch of
generated 7x7 mazes) is compressed once per mode (``LaserConfig(mode=...)``, deep copies of the
same weights) and trained with AdamW (``--lr``, 1e-3 by default, an optimizer step after every
step, so the weights move as in training; 0 keeps them fixed). The modes' steps are interleaved (order alternating per round);
the first ``--warmup`` steps of each are skipped, the next ``--steps`` are measured:

- step: forward + backward of the TRM loss (the optimizer step is not timed);
- tracker: time inside `SubspaceTracker.compress` / ``decompress`` / ``settle`` /
  ``end_forward``, outermost calls only (a tracker method calling another counts once): wall
  time on a CPU, the device time between CUDA events around each call on a GPU
  (`benchmarks._tracker_probe`); with ``--per-site`` also per tracker (site, slot and role:
  the call site's role, ``@0``, ``@1``...), with its calls, power updates and resets; with
  ``--phases`` split into the steady state's projection, the reconstruction for backward, the
  refinements and the rest (`benchmarks._tracker_probe.PHASES`, means per step), next to the
  ideal: how far the two products the ideal times are from it inside a real step;
- ideal: for every compress call of the step that stored coefficients, the time of just
  ``C = X @ Q`` (X: ``(N, width)`` fp32, Q: ``(width, k)``) and ``C @ Qᵀ`` for its shapes
  (random tensors, median of ``--ideal-reps``, timed after the steps; the faster of C's two
  layouts, `ideal_seconds`); dense records: 0;
- resets and power updates: differences of ``tracker.stats()`` over the step, summed over the
  model's trackers (`laser_fx.report.compressed_sites`: wrappers and parameter sites);
- refinements by call: decisions that found a basis short, about a tracker's first call of
  the step (the first after the optimizer step moved the weights) or a later one
  (`benchmarks._tracker_probe.TrackerProbe`);
- host reads: calls of ``Tensor.item`` / ``__float__`` / ``__int__`` / ``__bool__`` /
  ``__index__`` / ``tolist`` made inside a tracker method (each is a device synchronisation on
  a GPU), and over the whole step;
- at once: refinements, resets and first bases built with values read back at once (on an
  accelerator each is a synchronising read; a refinement queued on the device with its Ritz
  step taken later is not one). On a CPU every refinement is taken at once, unless
  ``--defer-refinements`` runs the accelerator's decision path here (as the test suite's flag
  of that name does).

Prints a Markdown table (medians, with the IQR of step time and share; counts are means per
step); ``--out PATH.md`` also writes it there and the records to ``PATH.jsonl``. About 3
minutes on 1 thread of a loaded 2-core CPU with the defaults (191 s measured):

    PYTHONPATH=. python benchmarks/tracker_share.py [--modes auto region linear] [--d 128 256]
        [--steps 10] [--warmup 5] [--threads 1] [--config FIELD=VALUE ...]
        [--defer-refinements] [--per-site] [--phases] [--out results/tracker_share.md]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import laser_fx
from laser_fx._linalg import skinny
from laser_fx.report import compressed_sites
from laser_fx.testing import deferred_refinements

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import _quantiles, machine, sync, trm_workload  # noqa: E402
from benchmarks._share_report import (  # noqa: E402
    markdown_table,
    phase_table,
    report,
    role_table,
    site_table,
)
from benchmarks._tracker_probe import TrackerProbe  # noqa: E402
from benchmarks.frontier import write_jsonl  # noqa: E402

__all__ = ["MODES", "config_fields", "ideal_seconds", "main", "tracker_counters"]

MODES = ("auto", "region", "linear")
#: stats() counters reported per step
COUNTERS = ("resets", "power_updates")
#: stats() counters kept per tracker (``--per-site``)
SITE_COUNTERS = ("calls", *COUNTERS)


def tracker_counters(model: nn.Module) -> dict[int, dict[str, int]]:
    """``id(tracker) -> {counter: value}`` (`SITE_COUNTERS` of ``stats()``) for every tracker
    of ``model``'s compressed sites (missing counters read 0)."""
    out: dict[int, dict[str, int]] = {}
    for store in compressed_sites(model):
        for trk in getattr(store, "trackers", {}).values():
            stats = trk.stats()
            out[id(trk)] = {c: int(stats.get(c, 0)) for c in SITE_COUNTERS}
    return out


def tracker_names(model: nn.Module) -> dict[int, tuple[str, int, int]]:
    """``id(tracker) -> ("site:slot@role", width, rank)`` for every tracker of ``model``."""
    out: dict[int, tuple[str, int, int]] = {}
    for store in compressed_sites(model):
        site = getattr(getattr(store, "site", None), "name", type(store).__name__)
        for key, trk in getattr(store, "trackers", {}).items():
            out[id(trk)] = (f"{site}:{key}", trk.width, int(trk.basis.shape[1]))
    return out


def _per_tracker(before: dict[int, dict[str, int]], after: dict[int, dict[str, int]],
                 seconds: dict[int, float]) -> dict[int, dict[str, float]]:
    """One step's counter deltas and seconds per tracker (a new tracker counts from 0)."""
    return {i: {"s": seconds.get(i, 0.0),
                **{c: v[c] - before.get(i, {}).get(c, 0) for c in SITE_COUNTERS}}
            for i, v in after.items()}


def site_rows(mode: str, d: int, steps: list[dict[str, Any]],
              names: dict[int, tuple[str, int, int]]) -> list[dict[str, Any]]:
    """Per-tracker means per step of the ``per_tracker`` records of ``steps``, the costliest
    first; ``share``: of the mode's tracker time over those steps."""
    total = sum(st["tracker_s"] for st in steps)
    rows = []
    for i in {i for st in steps for i in st["per_tracker"]}:
        per = [st["per_tracker"][i] for st in steps if i in st["per_tracker"]]
        name, width, rank = names.get(i, ("?", 0, 0))
        seconds = sum(p["s"] for p in per)
        rows.append({"mode": mode, "D": d, "site": name, "width": width, "rank": rank,
                     **{c: sum(p[c] for p in per) / len(steps) for c in SITE_COUNTERS},
                     "ms": 1e3 * seconds / len(steps),
                     "share": seconds / total if total > 0 else 0.0})
    return sorted(rows, key=lambda r: -r["ms"])


def _summed(per_tracker: dict[int, dict[str, float]]) -> dict[str, float]:
    """The step's `COUNTERS`: the per-tracker deltas summed over the model's trackers."""
    return {c: sum(v[c] for v in per_tracker.values()) for c in COUNTERS}


def ideal_seconds(shapes: Iterable[tuple[int, int, int]], *, reps: int = 9,
                  device: str = "cpu", seed: int = 0) -> dict[tuple[int, int, int], float]:
    """Seconds of ``C = X @ Q`` plus ``C @ Qᵀ`` (fp32, random tensors) for each distinct
    ``(N, width, k)`` of ``shapes``: the median of ``reps`` timed runs after one warm-up, for
    each of the two layouts of C (``N x k`` as ``X @ Q`` writes it, or ``k x N`` as the
    tracker computes it, `laser_fx._linalg.skinny`), the faster kept: an ideal is never
    slower than the layout the tracker picked."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[tuple[int, int, int], float] = {}
    for n, width, k in dict.fromkeys(shapes):
        x = torch.randn(n, width, generator=gen).to(device)
        q = torch.randn(width, k, generator=gen).to(device)
        best = math.inf
        for project in (torch.matmul, skinny):
            times = []
            for r in range(reps + 1):
                sync(device)
                t0 = time.perf_counter()
                c = project(x, q)
                c @ q.T
                sync(device)
                if r:
                    times.append(time.perf_counter() - t0)
            best = min(best, statistics.median(times))
        out[(n, width, k)] = best
    return out


def _median_iqr(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return (values[0],) * 3
    q = statistics.quantiles(values, n=4)
    return statistics.median(values), q[0], q[2]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--d", type=int, nargs="+", default=[128, 256], help="TRM widths D")
    p.add_argument("--n", type=int, default=6, help="TRM z-updates per cycle")
    p.add_argument("--T", type=int, default=3, help="TRM cycles (the last one with grad)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=5, help="steps skipped first (per mode)")
    p.add_argument("--ideal-reps", type=int, default=9, help="timed runs per ideal shape")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW learning rate between steps (0: the weights stay fixed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="", help="Markdown file; records go to the same path "
                   "with .jsonl ('' : print only)")
    p.add_argument("--note", default="", help="a line written under the table (machine load)")
    p.add_argument("--config", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="LaserConfig fields for every mode, e.g. energy=0.99 oversample=0")
    p.add_argument("--per-site", action="store_true",
                   help="also a table per tracker (site, slot and role): time, calls, "
                        "refinements")
    p.add_argument("--phases", action="store_true",
                   help="also the tracker time by phase: projection, reconstruction, "
                        "refinement, other")
    p.add_argument("--defer-refinements", action="store_true",
                   help="the accelerator's decision path on this device (refinements queued, "
                        "their Ritz steps taken later)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0, got {a.steps} and {a.warmup}")
    try:
        a.config_kw = config_fields(a.config)
        laser_fx.LaserConfig(**a.config_kw)
    except (ValueError, TypeError, laser_fx.ConfigError) as err:
        p.error(f"--config: {err}")
    return a


def config_fields(items: Sequence[str]) -> dict[str, Any]:
    """``["energy=0.99", "oversample=0"]`` -> ``{"energy": 0.99, "oversample": 0}`` (ints,
    floats, ``None``, or the text as it is)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"expected FIELD=VALUE, got {item!r}")
        if name == "mode":
            raise ValueError("the mode comes from --modes")
        value: Any = text
        for parse in (int, float):
            try:
                value = parse(text)
                break
            except ValueError:
                pass
        out[name] = None if text == "None" else value
    return out


def _measure_width(a: argparse.Namespace, d: int) -> tuple[str, list[dict[str, Any]]]:
    w = trm_workload(mixer="attn", d=d, n=a.n, T=a.T, batch=a.batch)
    w.to(a.device)
    models = {m: w.compress(copy.deepcopy(w.model), laser_fx.LaserConfig(mode=m, **a.config_kw))
              for m in a.modes}
    opts = {m: torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=a.lr)
            for m, mod in models.items()}
    probe = TrackerProbe(a.device, phases=a.phases)
    per_step: dict[str, list[dict[str, Any]]] = {m: [] for m in a.modes}
    for r in range(a.warmup + a.steps):
        for mode in a.modes if r % 2 == 0 else a.modes[::-1]:
            model, opt = models[mode], opts[mode]
            opt.zero_grad(set_to_none=True)
            measured = r >= a.warmup
            before = tracker_counters(model) if measured else {}
            probe.begin()
            with probe if measured else contextlib.nullcontext():
                sync(a.device)
                t0 = time.perf_counter()
                w.loss(w.run(model)).backward()
                sync(a.device)
                seconds = time.perf_counter() - t0
            opt.step()
            if measured:
                per_tracker = _per_tracker(before, tracker_counters(model), probe.by_tracker)
                per_step[mode].append({
                    "step_s": seconds, "tracker_s": probe.seconds,
                    "shapes": Counter(probe.shapes), "dense": probe.dense,
                    "calls": probe.calls["compress"], "host_reads": probe.host_reads,
                    "first_refines": probe.first_refines, "later_refines": probe.later_refines,
                    "at_once": probe.at_once,
                    "all_reads": probe.all_reads,
                    "phases": probe.phases if a.phases else None,
                    "per_tracker": per_tracker, **_summed(per_tracker)})
            probe.begin()  # drop the step's records
    rows = []
    for mode, steps in per_step.items():
        cost = ideal_seconds([s for st in steps for s in st["shapes"]], reps=a.ideal_reps,
                             device=a.device)
        ideals = [sum(n * cost[s] for s, n in st["shapes"].items()) for st in steps]
        shares = [st["tracker_s"] / st["step_s"] for st in steps]
        ratios = [st["tracker_s"] / i for st, i in zip(steps, ideals, strict=True) if i > 0]
        share, s25, s75 = _median_iqr(shares)
        def mean(key: str, steps: list[dict[str, Any]] = steps) -> float:
            return statistics.fmean(st[key] for st in steps)

        times = _quantiles([st["step_s"] for st in steps])
        rows.append({
            "mode": mode, "D": d, **times,
            "tracker_ms": 1e3 * statistics.median(st["tracker_s"] for st in steps),
            "tracker_share": share, "share_q25": s25, "share_q75": s75,
            "ideal_ms": 1e3 * statistics.median(ideals),
            "ratio": statistics.median(ratios) if ratios else None,
            "calls": mean("calls"), "dense_calls": mean("dense"),
            "resets": mean("resets"), "power_updates": mean("power_updates"),
            "first_refines": mean("first_refines"), "later_refines": mean("later_refines"),
            "at_once": mean("at_once"),
            "host_reads": mean("host_reads"), "all_reads": mean("all_reads"),
            "host_reads_per_call": (sum(st["host_reads"] for st in steps)
                                    / max(sum(st["calls"] for st in steps), 1)),
            "shapes": sorted({f"{n}x{wd}x{k}" for st in steps for (n, wd, k) in st["shapes"]}),
            "steps": len(steps),
        })
        if a.phases:
            rows[-1]["phases_ms"] = {p: 1e3 * statistics.fmean(st["phases"][p] for st in steps)
                                     for p in steps[0]["phases"]}
            rows[-1]["ideal_mean_ms"] = 1e3 * statistics.fmean(ideals)
        if a.per_site:
            rows[-1]["sites"] = site_rows(mode, d, steps, tracker_names(models[mode]))
    return w.name, rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns one row per (mode, D) (keys as in the JSON lines)."""
    a = _parse(argv)
    torch.set_num_threads(a.threads)
    where = machine()
    print(f"machine: {where}; device {a.device}")
    rows: list[dict[str, Any]] = []
    names = []
    jsonl = str(Path(a.out).with_suffix(".jsonl")) if a.out else None
    for d in a.d:
        with deferred_refinements() if a.defer_refinements else contextlib.nullcontext():
            name, got = _measure_width(a, d)
        names.append(name)
        rows.extend(got)
        for r in got:
            write_jsonl(jsonl, "tracker_share", {"workload": name, "args": vars(a),
                                                 "machine": where, **r},
                        fresh=r is rows[0])
        print(f"\n### {name}\n\n{markdown_table(got)}", flush=True)
    if a.phases:
        print(f"\n{phase_table(rows)}", flush=True)
    sites = [s for r in rows for s in r.get("sites", [])]
    if sites:
        print(f"\n{site_table(sites)}\n\n{role_table(sites)}", flush=True)
    if a.out:
        cmd = "PYTHONPATH=. python benchmarks/tracker_share.py " + shlex.join(
            sys.argv[1:] if argv is None else argv)
        text = report(a, cmd, where, names, rows, sites)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
        print(f"\nwritten: {a.out}, {jsonl}")
    return rows


if __name__ == "__main__":
    main()
