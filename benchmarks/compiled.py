"""Compiled benchmark: laser_fx against what a user who compiles the TRM already has.

Issue 15 item 5, on the TRM attention model (examples/trm, random init, generated 7x7 mazes;
D=``--d``, n=6, T=3, batch 16), each configuration a deep copy of the same initial model, the
compiled ones all with ``--backend``: ``eager`` / ``eager-laser`` (references: eager
uncompressed, laser_fx default); ``unc`` (``torch.compile(model)``); ``ckpt`` (the shared
``net`` in a non-reentrant ``torch.utils.checkpoint`` per call); ``budget0.5`` / ``budget0.1``
(``torch._functorch.config.patch(activation_memory_budget=...)`` around compile and runs);
``laser`` / ``region`` / ``linear`` (``laser_fx.compress(..., config=LaserConfig(mode=...,
compile_backend=backend))``). Measured: first step (forward + backward, cold compile); step
time (median [IQR] of ``--steps`` steps after ``--warmup`` rounds, interleaved, order
alternating); after-forward and peak memory; cosine of the first measured step's parameter
gradients to the eager uncompressed model's (same weights and batch, no optimizer step).
The weights stay at their random init unless ``--lr`` asks for an AdamW step after every
step (not timed; the weights then move as in training and the trackers see what they see
in training; the cosine is then the cold first step's);
``--explain``: `torch._dynamo.explain` of a fresh copy; the compiled share of a step. Methods:

- Own compiled code: dynamo keys compiled code by code object (TRM's ``forward``); its guards
  tell neither deep copies nor the functorch budget apart (a budget configuration would run
  the uncompressed graphs), so each compiled configuration compiles an entry function with its
  own code object that calls the model (dynamo inlines the call). Dynamo also marks a code
  object it gives up on (a graph break inside a loop: region mode's opaque block calls in
  TRM's recursion) to be skipped from then on, for every caller, existing compiled code
  included: one region configuration made every later TRM configuration run its recursion
  eagerly. So each configuration's model classes are subclasses holding fresh copies of the
  classes' functions (`laser_fx.testing.own_code`): their frames are their own.
- Cold compile: ``torch._dynamo.reset()``, inductor's in-memory caches cleared and an inductor
  cache directory of its own before each configuration's first step; each recompiles once in
  the first warm-up round, from that cache (``rewarm_s``); graphs compiled in timed steps are
  reported.
- Memory: `laser_fx.measure_activation_memory` would measure the eager model (dynamo skips
  frames while a TorchDispatchMode is active); the profiler's allocation events count every
  CPU allocation: bytes allocated in the step and alive after forward and loss; their maximum.
  With ``--device cuda``: the caching allocator's allocated bytes (`cuda_memory`), and the
  host synchronisations of the timed steps, counted by ``torch.cuda.set_sync_debug_mode``
  ("warn") by calling line (`benchmarks._common.host_syncs`).
- Compiled share: the union of the intervals of the profiler events ``CompiledFunction``,
  ``CompiledFunctionBackward`` (AOT forward / backward) and ``## Call CompiledFxGraph``
  (inductor) over the wall time of one profiled step (dynamo's ``Torch-Compiled Region`` also
  encloses a frame's graph breaks). Backend "eager" has no AOT graphs: share 0.
- Graph breaks: explain's break and graph counts, and frames dynamo skipped (run eagerly, e.g.
  on a "graph break in a loop", which explain does not count as a break).

Rewrites ``--out`` (Markdown) and its ``.jsonl`` after every configuration. One D with
inductor on a loaded 2-core CPU takes tens of minutes:

    PYTHONPATH=. python benchmarks/compiled.py [--d 128 256] [--steps 5] [--warmup 2]
        [--backend inductor] [--configs ...] [--explain] [--out results/compiled.md]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import laser_fx
from laser_fx.testing import entry, own_code

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (  # noqa: E402
    Workload,
    _quantiles,
    _torch_checkpointed,
    host_syncs,
    machine,
    sync,
    sync_row,
    sync_sources,
    trm_workload,
)
from benchmarks._compiled_measures import (  # noqa: E402
    compiled_share,
    cuda_memory,
    profiled_memory,
    step,
)

__all__ = ["COLUMNS", "CONFIGS", "compiled_share", "cuda_memory", "main", "markdown_table",
           "profiled_memory"]

#: key -> (label, compiled, activation_memory_budget, laser mode or None)
CONFIGS: dict[str, tuple[str, bool, float | None, str | None]] = {
    "eager": ("eager uncompressed", False, None, None),
    "eager-laser": ("eager laser_fx default", False, None, "auto"),
    "unc": ("compiled uncompressed", True, None, None),
    "ckpt": ("compiled torch checkpoint", True, None, None),
    "budget0.5": ("compiled activation_memory_budget=0.5", True, 0.5, None),
    "budget0.1": ("compiled activation_memory_budget=0.1", True, 0.1, None),
    "laser": ("compiled laser_fx default", True, None, "auto"),
    "region": ("compiled laser_fx region", True, None, "region"),
    "linear": ("compiled laser_fx linear", True, None, "linear"),
}
COLUMNS = ("configuration", "first step s (x unc.)", "step ms median [IQR]", "time x unc.",
           "time x ckpt", "after-fwd MiB", "after-fwd x unc.", "peak MiB", "peak x unc.",
           "peak x ckpt", "grad cosine", "breaks / graphs / frames skipped", "compiled share")
MIB = 2.0**20


@dataclass
class _Config:
    key: str
    module: nn.Module  # the model; `call` runs it (compiled or not)
    call: Callable[..., Any]
    cache_dir: str | None
    row: dict[str, Any] = field(default_factory=dict)
    opt: torch.optim.Optimizer | None = None  # with --lr: AdamW after each step (not timed)

    def update(self) -> None:
        """The optimizer step after a training step (``--lr``; nothing with weights fixed)."""
        if self.opt is not None:
            self.opt.step()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Its own inductor cache directory and activation-memory budget, while it runs."""
        budget = CONFIGS[self.key][2]
        env = {"TORCHINDUCTOR_CACHE_DIR": self.cache_dir} if self.cache_dir else {}
        knob = {} if budget is None else {"activation_memory_budget": budget}
        with mock.patch.dict(os.environ, env), torch._functorch.config.patch(**knob):
            yield


def _build(key: str, w: Workload, backend: str) -> nn.Module:
    """A deep copy of ``w.model`` (`own_code`) changed as configuration ``key`` says (not
    compiled)."""
    _, compiled, _, mode = CONFIGS[key]
    model = own_code(copy.deepcopy(w.model))
    if key == "ckpt":
        return _torch_checkpointed(model, w.shared_path)
    kw = {"compile_backend": backend} if compiled else {}
    return model if mode is None else w.compress(model, laser_fx.LaserConfig(mode=mode, **kw))


def _params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _flat_grads(module: nn.Module) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten().double()
                      for p in _params(module)])


def _explain(w: Workload, key: str, backend: str) -> dict[str, Any]:
    """Graphs, graph breaks, frames skipped and break reasons of a fresh copy (resets dynamo)."""
    cnt = torch._dynamo.utils.counters
    cnt.clear()
    out = torch._dynamo.explain(_build(key, w, backend))(*w.inputs, **w.kwargs)
    reasons = Counter({k.strip().splitlines()[0][:160]: n for k, n in cnt["graph_break"].items()})
    return {"graphs": out.graph_count, "graph_breaks": out.graph_break_count,
            "frames_skipped": cnt["frames"]["total"] - cnt["frames"]["ok"],
            "break_reasons": dict(reasons.most_common(8))}


def _cold(w: Workload, key: str, a: argparse.Namespace, root: str, ref: Tensor) -> _Config:
    """Build configuration ``key`` and run its first step cold (compile included); ``ref``:
    the eager uncompressed model's gradients (the cosine's reference)."""
    compiled = CONFIGS[key][1]
    torch._dynamo.reset()
    torch._inductor.utils.clear_caches()
    t0 = time.perf_counter()
    module = _build(key, w, a.backend)
    compress_s = time.perf_counter() - t0
    call = torch.compile(entry(module, key), backend=a.backend) if compiled else module
    c = _Config(key, module, call, tempfile.mkdtemp(prefix=key, dir=root) if compiled else None)
    if a.lr > 0:
        c.opt = torch.optim.AdamW(_params(module), lr=a.lr)
    graphs = (stats := torch._dynamo.utils.counters["stats"])["unique_graphs"]
    with c.active():
        sync(a.device)
        t0 = time.perf_counter()
        step(w, c)
        sync(a.device)
        c.row.update(first_step_s=time.perf_counter() - t0, compress_s=compress_s,
                     graphs_compiled=stats["unique_graphs"] - graphs)
        if a.lr > 0:  # the weights move from here on: compare while they are the reference's
            c.row["grad_cosine"] = float(F.cosine_similarity(_flat_grads(module), ref, 0))
        c.update()
        if a.explain and compiled:
            c.row.update(_explain(w, key, a.backend))
    return c


def _ratios(rows: list[dict[str, Any]]) -> None:
    by = {r["key"]: r for r in rows}
    for r in rows:
        for ref in ("unc", "ckpt", "eager"):
            for k in ("first_step_s", "step_ms", "after_forward_bytes", "peak_bytes"):
                # (an eager first step compiles nothing: no compile-time ratio)
                if k in r and by.get(ref, {}).get(k) and (CONFIGS[r["key"]][1] or k[0] != "f"):
                    r[f"{k}_x_{ref}"] = r[k] / by[ref][k]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per configuration (`COLUMNS`); '-' where not measured (yet)."""
    def f(r: dict[str, Any], k: str, fmt: str, scale: float = 1.0, unit: str = "") -> str:
        return format(r[k] * scale, fmt) + unit if r.get(k) is not None else "-"

    syncs = any("host_syncs_per_step" in r for r in rows)  # measured on CUDA devices
    columns = (*COLUMNS, "host syncs / step") if syncs else COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        first = f(r, "first_step_s", ".1f") + (f" ({r['first_step_s_x_unc']:.2f}x)"
                                               if "first_step_s_x_unc" in r else "")
        step = (f"{r['step_ms']:.0f} [{r['q25_ms']:.0f}-{r['q75_ms']:.0f}]"
                if "step_ms" in r else "-")
        breaks = (f"{r['graph_breaks']} / {r['graphs']} / {r['frames_skipped']}"
                  if "graph_breaks" in r else "-")
        ratios = [f(r, k, ".2f" if k.startswith("step") else ".3f", unit="x") for k in (
            "step_ms_x_unc", "step_ms_x_ckpt", "after_forward_bytes_x_unc", "peak_bytes_x_unc",
            "peak_bytes_x_ckpt")]
        cells = [r["label"], first, step, *ratios[:2], f(r, "after_forward_bytes", ".2f", 1 / MIB),
                 ratios[2], f(r, "peak_bytes", ".2f", 1 / MIB), *ratios[3:],
                 f(r, "grad_cosine", ".6f"), breaks, f(r, "compiled_share", ".1%")]
        if syncs:
            cells.append(f(r, "host_syncs_per_step", ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report(a: argparse.Namespace, records: list[dict[str, Any]]) -> str:
    parts = ["# Compiled benchmark (issue 15 item 5)\n", f"command: `{a.command}`\n",
             f"machine: {machine()}\n", "Methods: the docstring of benchmarks/compiled.py "
             "(own compiled code and a cold first step per configuration; memory from the "
             + ("CUDA caching allocator's counts; host syncs counted by "
                "torch.cuda.set_sync_debug_mode('warn') over the timed steps"
                if a.device.startswith("cuda") else "profiler's allocation events")
             + "; compiled share: CompiledFunction(Backward) / "
             "CompiledFxGraph event time over a profiled step). Ratios of medians and bytes.\n"]
    for rec in records:
        lr = rec.get("lr", 0.0)
        parts += [f"## {rec['workload']}\n",
                  f"backend {rec['backend']}, {rec['steps']} interleaved steps after "
                  f"{rec['warmup']} warm-up rounds, "
                  + (f"AdamW lr {lr:g} after every step (not timed), " if lr else "weights fixed, ")
                  + f"{rec['elapsed_s']:.0f} s"
                  + ("" if rec["complete"] else " so far (incomplete)") + "\n",
                  markdown_table(rec["rows"]) + "\n"]
        for r in rec["rows"]:
            if r.get("graphs_compiled_timed"):
                parts.append(f"- {r['label']}: {r['graphs_compiled_timed']} graph(s) compiled "
                             "during the timed steps (recompiles): its step time is not steady")
            if r.get("break_reasons"):
                why = "; ".join(f"{n}x {k}" for k, n in r["break_reasons"].items())
                parts.append(f"- {r['label']}: graph breaks: {why}")
            if sync_sources(r):
                parts.append(f"- {r['label']}: host syncs per step from {sync_sources(r)}")
            if r.get("error"):
                parts.append(f"- {r['label']}: FAILED: {r['error']}")
        parts.append("")
    return "\n".join(parts) + "\n"


def _run_width(d: int, a: argparse.Namespace, records: list[dict[str, Any]], root: str
               ) -> dict[str, Any]:
    w = trm_workload(mixer="attn", d=d, n=a.n, T=a.T, batch=a.batch)
    w.to(a.device)
    t_start = time.perf_counter()
    rec: dict[str, Any] = {"workload": w.name, "d": d, "backend": a.backend, "steps": a.steps,
                           "warmup": a.warmup, "lr": a.lr, "machine": machine(),
                           "command": a.command,
                           "rows": [], "complete": False, "elapsed_s": 0.0}
    records.append(rec)
    w.loss(w.run(ref_model := copy.deepcopy(w.model))).backward()
    ref = _flat_grads(ref_model)
    cfgs: list[_Config] = []
    failed: dict[str, str] = {}

    def save() -> None:
        rec["rows"] = [dict(c.row, key=c.key, label=CONFIGS[c.key][0]) for c in cfgs]
        rec["rows"] += [dict(key=k, label=CONFIGS[k][0], error=e) for k, e in failed.items()]
        _ratios(rec["rows"])
        rec["elapsed_s"] = time.perf_counter() - t_start
        if a.out:
            out = Path(a.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            out.write_text(_report(a, records))

    for key in a.configs:  # cold phase: one configuration at a time
        if a.max_cold_s and time.perf_counter() - t_start > a.max_cold_s:
            failed[key] = f"not run: the cold phase passed --max-cold-s {a.max_cold_s:g}"
            continue
        try:
            cfgs.append(_cold(w, key, a, root, ref))
        except Exception as e:  # noqa: BLE001 - a configuration that fails is a finding
            failed[key] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
        save()
        print(f"D={d} {key}: first step ({time.perf_counter() - t_start:.0f} s)", flush=True)
    times: dict[str, list[float]] = {c.key: [] for c in cfgs}
    syncs: dict[str, Counter[str]] = {c.key: Counter() for c in cfgs}
    stats = torch._dynamo.utils.counters["stats"]
    for r in range(a.warmup + a.steps):  # interleaved phase
        for c in cfgs if r % 2 == 0 else cfgs[::-1]:
            graphs = stats["unique_graphs"]
            with c.active():
                sync(a.device)
                t0 = time.perf_counter()
                with host_syncs(a.device) as found:
                    step(w, c)
                sync(a.device)
                dt = time.perf_counter() - t0
                c.update()
            if r == 0:
                c.row["rewarm_s"] = dt  # earlier configurations recompile here (warm cache)
            if r >= a.warmup:
                times[c.key].append(dt)
                syncs[c.key].update(found)
                c.row["graphs_compiled_timed"] = (c.row.get("graphs_compiled_timed", 0)
                                                  + stats["unique_graphs"] - graphs)
            if r == a.warmup and a.lr == 0:
                c.row["grad_cosine"] = float(F.cosine_similarity(_flat_grads(c.module), ref, 0))
    for c in cfgs:  # memory and compiled share, saved per configuration
        c.row.update(_quantiles(times[c.key]))
        if len(times[c.key]) >= 2:  # inclusive quartiles: never outside the measured range
            q = statistics.quantiles(times[c.key], n=4, method="inclusive")
            c.row.update(q25_ms=1e3 * q[0], q75_ms=1e3 * q[2])
        if a.device.startswith("cuda"):
            c.row.update(sync_row(syncs[c.key], len(times[c.key])))
        with c.active():
            measure = cuda_memory if a.device.startswith("cuda") else profiled_memory
            c.row["after_forward_bytes"], c.row["peak_bytes"] = measure(w, c)
            c.row["compiled_share"] = compiled_share(w, c)
        save()
        print(f"D={d} {c.key}: measured ({time.perf_counter() - t_start:.0f} s)", flush=True)
    rec["complete"] = True
    save()
    return rec


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, nargs="+", default=[128, 256], help="TRM widths D")
    for name, default in (("--n", 6), ("--T", 3), ("--batch", 16)):  # TRMConfig n, T; batch
        p.add_argument(name, type=int, default=default)
    p.add_argument("--steps", type=int, default=5, help="timed interleaved steps")
    p.add_argument("--warmup", type=int, default=2, help="interleaved rounds before (>= 1)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (all configs)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--explain", action="store_true", help="torch._dynamo.explain (slow)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (CUDA: allocator memory, "
                   "host synchronisations counted in the timed steps)")
    p.add_argument("--max-cold-s", type=float, default=0.0,
                   help="build no further configuration once the cold phase has taken this "
                        "long (0: no limit); the ones built are still timed")
    p.add_argument("--lr", type=float, default=0.0,
                   help="AdamW learning rate between steps, not timed (0: weights fixed); the "
                        "gradient cosine is then the cold first step's")
    p.add_argument("--out", default="", help="Markdown file (also writes .jsonl next to it)")
    a = p.parse_args(argv)
    if a.warmup < 1 or a.steps < 1:
        p.error("--warmup and --steps must be >= 1 (the first round recompiles from cache)")
    a.command = "PYTHONPATH=. python benchmarks/compiled.py " + shlex.join(
        sys.argv[1:] if argv is None else list(argv))
    return a


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns one record per D (``workload``, ``rows``, ...)."""
    a = _parse(argv)
    torch.set_num_threads(a.threads)
    print(f"machine: {machine()}; backend {a.backend}", flush=True)
    records: list[dict[str, Any]] = []
    root = tempfile.mkdtemp(prefix="laser_fx_compiled_")
    try:  # the backend's one-time costs (imports, compile workers) before any configuration
        with mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=root)}):
            x = torch.ones(2, requires_grad=True, device=a.device)
            torch.compile(lambda t: t.sin().sum(), backend=a.backend)(x).backward()
        for d in a.d:
            rec = _run_width(d, a, records, root)
            print(f"\n### {rec['workload']}\n\n{markdown_table(rec['rows'])}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return records


if __name__ == "__main__":
    main()
