"""The accuracy / memory experiment: baseline vs LASER TRMs, several seeds, Sudoku and maze.

Each (task, seed) trains both arms in lockstep from the same initial weights (`train.run`),
appends one JSON line to ``<out-dir>/trm_runs.jsonl`` when it finishes (a rerun skips the
lines already there for the same configuration), and rewrites the report
``<out-dir>/trm.md`` and plot ``<out-dir>/trm_accuracy_memory.png`` after every run, marked
partial until all runs are in.

Usage (from the repository root)::

    nohup env PYTHONPATH=. .venv/bin/python examples/trm/experiment.py \\
        > results/trm_experiment.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples` and `laser_fx` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scipy import stats

import laser_fx
from examples.trm import train
from laser_fx.errors import ConfigError

__all__ = [
    "SMALL_TASKS",
    "TASKS",
    "load_runs",
    "main",
    "paired_difference",
    "run_experiment",
    "welch_t_test",
    "write_report",
]

# Sized on this 2-core box (see SIZING): the baseline reaches non-trivial exact accuracy and
# all runs of both tasks (8 seeds) fit in about 70 minutes.
TASKS: dict[str, dict[str, Any]] = {
    "sudoku": {"task": "sudoku", "size": 6, "mixer": "mlp_t", "d": 64, "n": 3, "T": 2,
               "batch": 64, "max_sup_steps": 2, "steps": 250, "lr": 2e-3,
               "n_train": 2000, "n_test": 500},
    "maze": {"task": "maze", "size": 7, "mixer": "attn", "d": 64, "n": 3, "T": 2,
             "batch": 64, "max_sup_steps": 2, "steps": 1000, "lr": 1e-3, "grad_clip": 1.0,
             "schedule": "cosine", "n_train": 2000, "n_test": 500},
}
SMALL_TASKS: dict[str, dict[str, Any]] = {  # `--preset small`: a ~15 minute version
    "sudoku": {"task": "sudoku", "size": 4, "mixer": "mlp_t", "d": 64, "n": 3, "T": 2,
               "batch": 64, "max_sup_steps": 2, "steps": 175, "lr": 2e-3,
               "n_train": 2000, "n_test": 500},
    "maze": {"task": "maze", "size": 5, "mixer": "attn", "d": 64, "n": 3, "T": 2,
             "batch": 64, "max_sup_steps": 2, "steps": 80, "lr": 1e-3, "grad_clip": 1.0,
             "n_train": 2000, "n_test": 500},
}

SIZING = """\
Sizing (baseline-only pilots, seed 0, exact accuracy on 500 held-out puzzles, this machine
under load from other jobs). 4x4 Sudoku, `mlp_t`, lr 3e-3: 0% (50 steps), 16% (100), 88%
(150), 97% (300); lr 2e-3: 0.4% (100), 58% (150), 83% (175), 92% (200). 6x6 Sudoku (16
blanks), lr 2e-3: 0% (100), 41% (200), 82% (300), 90% (400), 94% (600). 5x5 mazes learn in
~50 steps to a 92.4% plateau (lr 3e-3 without clipping then collapsed to 0%, hence lr 1e-3
and gradient-norm clipping at 1); 7x7 mazes, lr 1e-3, clip 1: 0.6% (100), 2.6% (300), 4.8%
(400), 13% (500), 18% (600), still rising; lr 3e-3 or ACT max 4 did not help within 300.
Longer (session 2, `train.py --task maze --size 7 --steps 1200 --lr 1e-3 --grad-clip 1
--no-laser --eval-every 200`): 0.2% (200), 4.8% (400), 18% (600), 21% (800), 2% (1000), 13%
(1200): unstable at a constant lr, so more steps alone do not reach 30%. 6x6 mazes are
saturated instead: 93% exact after 100 steps, 100% at 500 (min path 6); with `--difficulty
11`, 89% after 100, 100% at 500.
Session 3, cosine decay to 0.1x lr after the warm-up (`train.py --task maze --size 7 --mixer
attn --steps 1000 --lr 1e-3 --grad-clip 1 --schedule cosine --no-laser --eval-every 200`),
seed 0: 1.4% (200), 9.2% (400), 30% (600), 37% (800), 39.8% (1000); with `--lr 2e-3`: 19.6%
(1000). The same schedule hurt 6x6 Sudoku (`--task sudoku --size 6 --steps 250 --lr 2e-3
--schedule cosine --no-laser --seeds 0 1 2`): 3-11% exact, so Sudoku keeps its constant lr.
Chosen: 6x6 Sudoku, 250 steps, constant lr; 7x7 maze, 1000 steps, cosine lr. (Session 2's
7x7 maze at 600 constant-lr steps reached 16.2 +- 4.0%.) `--preset small` (4x4 Sudoku 175
steps, 5x5 maze 80 steps, 6 seeds, done first): Sudoku exact 91.4 ± 5.0 (baseline) vs 90.4 ± 5.8 (LASER), p = 0.77; maze 92.4% for both arms in
every seed but one (a plateau, uninformative)."""


# ----------------------------------------------------------------------------- statistics
def welch_t_test(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Welch's unequal-variance t-test, two-sided (`scipy.stats.ttest_ind`, equal_var=False).

    Args:
        a, b: samples of at least 2 values each.

    Returns:
        (t, df, p). Equal constant samples give (0, inf, 1); different ones (±inf, inf, 0).
    """
    if len(a) < 2 or len(b) < 2:
        raise ConfigError(f"welch_t_test needs >= 2 values per sample, got {len(a)} and {len(b)}.")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0:  # scipy returns nan here; identical arms are p = 1, distinct ones p = 0
        return (0.0, math.inf, 1.0) if diff == 0 else (math.copysign(math.inf, diff), math.inf, 0.0)
    res = stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.df), float(res.pvalue)


def paired_difference(a: list[float], b: list[float], level: float = 0.95
                      ) -> tuple[float, float, float, float]:
    """Mean of ``b - a`` over paired samples, its confidence interval and the paired t-test p
    (`scipy.stats.ttest_rel`).

    Both arms of a run share their initial weights and batches, so seed k of one arm is paired
    with seed k of the other.

    Returns:
        (mean difference, CI low, CI high, two-sided p).
    """
    if len(a) != len(b) or len(a) < 2:
        raise ConfigError(f"paired_difference needs two equal-length samples of >= 2 values, "
                          f"got {len(a)} and {len(b)}.")
    d = [y - x for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(d)
    if statistics.stdev(d) == 0:  # scipy returns nan: every seed moved by the same amount
        return mean, mean, mean, 1.0 if mean == 0 else 0.0
    res = stats.ttest_rel(b, a)
    ci = res.confidence_interval(confidence_level=level)
    return mean, float(ci.low), float(ci.high), float(res.pvalue)


# ---------------------------------------------------------------------------------- runs
def _key(spec: dict[str, Any], seed: int) -> str:
    return json.dumps({**spec, "seed": seed}, sort_keys=True)


def load_runs(path: Path) -> list[dict[str, Any]]:
    """The finished runs in a JSONL file (a torn last line from a killed run is ignored)."""
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return runs


def _one_run(spec: dict[str, Any], seed: int, threads: int) -> dict[str, Any]:
    args = argparse.Namespace(**spec, seeds=[seed], threads=threads, progress=False)
    return train.run(args, log=lambda s: None)


def run_experiment(
    out_dir: Path,
    tasks: dict[str, dict[str, Any]] | None = None,
    seeds: list[int] | None = None,
    *,
    jobs: int = 1,
    threads: int = 1,
    command: str = "",
    git_root: Path | None = None,
    log=print,
) -> dict[str, Any]:
    """Run every missing (task, seed), appending to trm_runs.jsonl and rewriting the report.

    Args:
        out_dir: where trm_runs.jsonl, trm.md and trm_accuracy_memory.png go.
        tasks: name -> train options (default `TASKS`).
        seeds: model seeds (default 0..4).
        jobs: worker processes (0: in this process, for tests).
        threads: torch threads per run.
        command: the command line recorded in the report.
        git_root: the checkout whose commit each run records (default: this file's); for a
            run from a frozen copy of the code outside git.
        log: progress messages.

    Returns:
        {"ran": runs started now, "skipped": runs already finished, "report": path}.
    """
    tasks = TASKS if tasks is None else tasks
    seeds = list(range(5)) if seeds is None else seeds
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "trm_runs.jsonl"
    done = {r["key"] for r in load_runs(jsonl)}
    todo = [(name, seed) for seed in seeds for name in tasks if _key(tasks[name], seed) not in done]
    skipped = len(tasks) * len(seeds) - len(todo)
    log(f"{len(todo)} runs to do, {skipped} already finished")
    commit = _commit(git_root)  # at launch: the checkout may move on while the runs go

    def finish(name: str, seed: int, result: dict[str, Any], seconds: float) -> None:
        line = {"key": _key(tasks[name], seed), "task": name, "seed": seed,
                "seconds": seconds, "commit": commit, "result": result}
        with jsonl.open("a") as f:
            f.write(json.dumps(line) + "\n")
        r = result["runs"][0]
        log(f"done {name} seed {seed} in {seconds:.0f}s: " + ", ".join(
            f"{arm} exact {a['eval']['raw']['exact_acc']:.1%}" for arm, a in r["arms"].items()))
        write_report(out_dir, tasks, seeds, command)

    if jobs <= 0:
        for name, seed in todo:
            t0 = time.perf_counter()
            finish(name, seed, _one_run(tasks[name], seed, threads), time.perf_counter() - t0)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            started = {pool.submit(_one_run, tasks[n], s, threads): (n, s, time.perf_counter())
                       for n, s in todo}
            for fut in as_completed(started):
                n, s, t0 = started[fut]
                finish(n, s, fut.result(), time.perf_counter() - t0)
    report = write_report(out_dir, tasks, seeds, command)
    return {"ran": len(todo), "skipped": skipped, "report": report}


def _commit(root: Path | None = None) -> str | None:
    """The checkout's commit (marked "+" when its code has uncommitted changes), or None
    outside git. ``root``: the checkout (default: the one this file is in)."""
    root = Path(__file__).resolve().parents[2] if root is None else root
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=10, check=True).stdout.strip()
        # code only: the experiment's own results files change while it runs
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "laser_fx", "examples", "pyproject.toml"],
                               cwd=root, text=True, capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+" if dirty.strip() else "")


# -------------------------------------------------------------------------------- report
def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()},"
            f" Python {platform.python_version()}, torch {torch.__version__}")


def _mean_std(xs: list[float], pct: bool = True) -> str:
    scale, unit = (100, "") if pct else (1, "")
    m = statistics.fmean(xs) * scale
    s = statistics.stdev(xs) * scale if len(xs) > 1 else float("nan")
    return f"{m:.1f} ± {s:.1f}{unit}"


def _collect(runs: list[dict[str, Any]], keys: set[str]) -> dict[str, dict[str, list[dict]]]:
    by_task: dict[str, dict[str, list[dict]]] = {}
    seen: set[str] = set()
    for line in runs:
        if line["key"] not in keys or line["key"] in seen:  # a run appended twice counts once
            continue
        seen.add(line["key"])
        r = line["result"]["runs"][0]
        for arm, a in r["arms"].items():
            by_task.setdefault(line["task"], {}).setdefault(arm, []).append({**a, "run": r})
    return by_task


def _pairs(arms: dict[str, list[dict]], metric: str, arm: str = "laser"
           ) -> list[tuple[float, float]]:
    """(baseline, ``arm``) values of `metric` for the seeds both arms finished."""
    by_seed = {a: {r["run"]["seed"]: r["eval"]["raw"][metric] for r in rs}
               for a, rs in arms.items()}
    base, other = by_seed.get("baseline", {}), by_seed.get(arm, {})
    return [(base[s], other[s]) for s in sorted(base.keys() & other.keys())]


_ARM_NAMES = {"laser": "LASER", "checkpoint": "torch checkpoint"}


def _paired_lines(arms: dict[str, list[dict]]) -> list[str]:
    """Per arm other than the baseline: the paired difference to it, seed by seed (Welch too)."""
    lines = []
    for arm in ("laser", "checkpoint"):
        if len(arms.get(arm, [])) < 2 or len(arms.get("baseline", [])) < 2:
            continue
        for metric in ("exact_acc", "token_acc"):
            b = [r["eval"]["raw"][metric] for r in arms["baseline"]]
            c = [r["eval"]["raw"][metric] for r in arms[arm]]
            t, df, p = welch_t_test(b, c)
            pairs = _pairs(arms, metric, arm)
            text = (f"\n{_ARM_NAMES[arm]} vs baseline, {metric}: Welch's t-test t = {t:.2f},"
                    f" df = {df:.1f}, p = {p:.3f}")
            if len(pairs) >= 2:
                m, lo, hi, pp = paired_difference(*zip(*pairs, strict=True))
                text += (f"; paired by seed ({_ARM_NAMES[arm]} - baseline, {len(pairs)} seeds):"
                         f" {100 * m:+.2f} points (mean drop {-100 * m:.2f}), 95% CI"
                         f" [{100 * lo:+.2f}, {100 * hi:+.2f}], paired t-test p = {pp:.3f}")
            lines.append(text)
    return lines


def _bytes_lines(arms: dict[str, list[dict]]) -> list[str]:
    """Per seed: LASER's ranks, calibrated energies and bytes against torch checkpoint's."""
    laser = {r["run"]["seed"]: r for r in arms.get("laser", [])}
    ckpt = {r["run"]["seed"]: r for r in arms.get("checkpoint", [])}
    if not laser:
        return []
    kib = 1 / 1024
    lines = ["", "Per seed, after training (one step on the same batch): LASER's stored inputs"
             " per slot as width/rank (rank 0: stored exactly), its calibrated energies and"
             " gradient cosine on the calibration micro-batch (at compress, the initial weights;"
             " the first `batch` training puzzles), the bytes its compressed calls kept"
             " (`laser_fx.report`: stored / what the same calls would keep without any checkpointing), and"
             " after-forward / peak memory of the LASER and torch checkpoint arms"
             " (`measure_activation_memory`).", "",
             "| seed | exact % base / ckpt / LASER | LASER ranks (width/rank) | energies |"
             " cosine | LASER kept KiB / dense KiB | after-fwd KiB LASER / ckpt | peak KiB"
             " LASER / ckpt |", "|---|---|---|---|---|---|---|---|"]
    base = {r["run"]["seed"]: r for r in arms.get("baseline", [])}
    for seed in sorted(laser):
        r = laser[seed]
        run = r["run"]
        ranks = "; ".join(f"{site}.{slot} {wr[0]}/{wr[1]}"
                          for site, slots in run.get("laser_ranks", {}).items()
                          for slot, wr in slots.items())
        sites = run["laser_report"]["sites"]
        energies = "; ".join(f"{s['name']} {s.get('energies') or '-'}" for s in sites)
        cos = ", ".join("-" if s.get("calibrated_cosine") is None
                        else f"{s['calibrated_cosine']:.5f}" for s in sites)
        tot = run["laser_report"]["totals"]
        c = ckpt.get(seed)
        ex = " / ".join("-" if d.get(seed) is None else f"{100 * d[seed]['eval']['raw']['exact_acc']:.1f}"
                        for d in (base, ckpt, laser))
        fwd = f"{r['activation_bytes'] * kib:.0f} / " + ("-" if c is None else
                                                          f"{c['activation_bytes'] * kib:.0f}")
        peak = f"{r['peak_bytes'] * kib:.0f} / " + ("-" if c is None else
                                                     f"{c['peak_bytes'] * kib:.0f}")
        lines.append(f"| {seed} | {ex} | {ranks} | {energies} | {cos} |"
                     f" {tot['stored_bytes'] * kib:.0f} / {tot['dense_bytes'] * kib:.0f} |"
                     f" {fwd} | {peak} |")
    pairs = [(laser[s], ckpt[s]) for s in sorted(laser.keys() & ckpt.keys())]
    if pairs:
        fwd = statistics.fmean(a["activation_bytes"] / c["activation_bytes"] for a, c in pairs)
        peak = statistics.fmean(a["peak_bytes"] / c["peak_bytes"] for a, c in pairs)
        kept = statistics.fmean(a["run"]["laser_report"]["totals"]["ratio"] or 1.0
                                for a, _ in pairs)
        low = sum(any(wr[1] > 0 for slots in a["run"].get("laser_ranks", {}).values()
                      for wr in slots.values()) for a, _ in pairs)
        lines += ["", f"LASER / torch checkpoint, mean over {len(pairs)} seeds: after-forward"
                  f" memory {fwd:.3f}x, peak {peak:.3f}x; LASER's compressed calls kept"
                  f" {kept:.3f}x of their dense bytes; low-rank (some rank > 0) in {low} of"
                  f" {len(pairs)} seeds."]
    return lines


def write_report(
    out_dir: Path, tasks: dict[str, dict[str, Any]], seeds: list[int], command: str = ""
) -> Path:
    """Write trm.md (and the plot) from the finished runs in out_dir/trm_runs.jsonl.

    Returns:
        The path of trm.md.
    """
    runs = load_runs(out_dir / "trm_runs.jsonl")
    keys = {_key(spec, s) for spec in tasks.values() for s in seeds}
    data = _collect(runs, keys)
    n_done = len({r["key"] for r in runs} & keys)
    partial = n_done < len(keys)
    lines = [
        "# TRM: accuracy and activation memory: uncompressed baseline, torch checkpoint, LASER",
        "",
        f"**{'PARTIAL: ' if partial else ''}{n_done} of {len(keys)} runs finished**"
        f" (written {time.strftime('%Y-%m-%d %H:%M')}).",
        "",
        "Each run trains both arms in lockstep from the same initial weights on the same batches"
        " (LASER: a deep copy of the baseline compressed in place by `laser_fx.compress` with"
        " `LaserConfig(granularity=\"block\", ...)`, the rest as in each task's config: its"
        " `energy`, or with `target_cosine` the energies `compress` calibrates per slot;"
        " torch checkpoint: `torch.utils.checkpoint` on every grad-enabled call of the same"
        " block). Accuracy on held-out puzzles (a different data seed), raw weights, all ACT"
        " steps; mean ± std over seeds. p: Welch's two-sided t-test against the baseline; and,"
        " since seed k of every arm shares weights and batches, the per-seed difference with"
        " its 95% confidence interval and paired t-test (`scipy.stats.ttest_rel`).",
        "Activation memory: `laser_fx.measure_activation_memory` of one training step on the"
        " same batch after training (bytes kept for backward; peak: maximum over forward and"
        " backward incl. parameter gradients); step time: median per run (first steps excluded), arms interleaved.",
        "",
        f"Machine: {_machine()}. One torch thread per run.",
        "",
        f"Command: `{command or 'PYTHONPATH=. .venv/bin/python examples/trm/experiment.py'}`",
        "",
        SIZING,
        "",
    ]
    for name, spec in tasks.items():
        arms = data.get(name, {})
        lines += [f"## {name}", "", "Config: `" + json.dumps(spec, sort_keys=True) + "`", ""]
        commits = sorted({r.get("commit") or "not recorded" for r in runs
                          if r["key"] in keys and r["task"] == name})
        if commits:
            dirty = any(c.endswith("+") for c in commits)
            lines += [f"Code: commit {', '.join(commits)}."
                      + (" (\"+\": the working tree had uncommitted changes to the code.)"
                         if dirty else ""), ""]
        if not arms:
            lines += ["(no finished runs yet)", ""]
            continue
        lines += ["| arm | runs | exact % | token % | EMA exact % | activation MiB | peak MiB"
                  " | step ms |", "|---|---|---|---|---|---|---|---|"]
        for arm, rs in arms.items():
            ex = [r["eval"]["raw"]["exact_acc"] for r in rs]
            tok = [r["eval"]["raw"]["token_acc"] for r in rs]
            ema = [r["eval"]["ema"]["exact_acc"] for r in rs if "ema" in r["eval"]]
            mib = statistics.fmean(r["activation_bytes"] for r in rs) / 2**20
            peak = statistics.fmean(r["peak_bytes"] for r in rs) / 2**20
            ms = statistics.fmean(r["step_time_median_s"] for r in rs) * 1e3
            lines.append(f"| {arm} | {len(rs)} | {_mean_std(ex)} | {_mean_std(tok)} |"
                         f" {_mean_std(ema) if ema else '-'} | {mib:.1f} | {peak:.1f} | {ms:.0f} |")
        lines += _paired_lines(arms)
        lines += _bytes_lines(arms)
        ratios = [r["run"]["memory_ratio"] for r in arms.get("laser", [])]
        times = [r["run"]["step_time_ratio"] for r in arms.get("laser", [])]
        sites = [s for r in arms.get("laser", []) for s in r["run"]["laser_report"]["sites"]]
        if sites:
            mechs = sorted({f"{s['name']} ({s['mechanism']}, width {s['width']})" for s in sites})
            ranks = [s["rank"] for s in sites]
            lines.append(f"\nLASER sites: {', '.join(mechs)}; final rank {min(ranks)}-{max(ranks)}"
                         f" (mean {statistics.fmean(ranks):.1f}) over runs.")
        if ratios:
            lines.append(f"\nActivation memory LASER / baseline: {statistics.fmean(ratios):.3f}x;"
                         f" step time LASER / baseline: {statistics.fmean(times):.2f}x"
                         f" (min {min(times):.2f}, max {max(times):.2f}).")
        secs = [r["run"]["compress_seconds"] for r in arms.get("laser", [])
                if "compress_seconds" in r["run"]]  # absent in runs recorded before it was
        if secs:
            lines.append(f"`laser_fx.compress` took {min(secs):.2f}-{max(secs):.2f} s per run.")
        lines.append("")
    plot = _plot(out_dir, data)
    if plot is not None:
        lines += [f"![accuracy vs activation memory]({plot.name})", ""]
    path = out_dir / "trm.md"
    path.write_text("\n".join(lines))
    return path


def _plot(out_dir: Path, data: dict[str, dict[str, list[dict]]]) -> Path | None:
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 4), squeeze=False)
    for ax, (name, arms) in zip(axes[0], data.items(), strict=True):
        for arm, rs in arms.items():
            xs = [r["activation_bytes"] / 2**20 for r in rs]
            ys = [100 * r["eval"]["raw"]["exact_acc"] for r in rs]
            ax.scatter(xs, ys, label=arm, alpha=0.7)
            ax.errorbar([statistics.fmean(xs)], [statistics.fmean(ys)],
                        yerr=[statistics.stdev(ys)] if len(ys) > 1 else None,
                        fmt="D", color="black", mfc="none", capsize=4)  # mean ± std
        ax.set(title=name, xlabel="activation memory of one step (MiB)",
               ylabel="held-out exact accuracy (%)")
        ax.set_xlim(left=0)
        ax.set_ylim(0, 100)
        ax.legend()
    fig.tight_layout()
    path = out_dir / "trm_accuracy_memory.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: run the experiment (missing runs only) and write the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("results"))
    p.add_argument("--preset", choices=("default", "small"), default="default")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    p.add_argument("--jobs", type=int, default=1, help="parallel runs (0: in-process)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="override every task's step count")
    p.add_argument("--energy", type=float, default=None,
                   help="LaserConfig.energy of the LASER arm (default: the library's)")
    p.add_argument("--target-cosine", type=float, default=None,
                   help="LaserConfig.target_cosine of the LASER arm: energies calibrated per slot"
                        " at compress (on the first batch of training puzzles)")
    p.add_argument("--recalibrate-every", type=int, default=None,
                   help="LaserConfig.recalibrate_every (with --target-cosine)")
    p.add_argument("--grad-cycles", type=int, default=None,
                   help="override every task's grad cycles (backprop through the last k of T)")
    p.add_argument("--git-root", type=Path, default=None,
                   help="record this checkout's commit (for a run from a frozen copy of the code)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report and exit")
    args = p.parse_args(argv)
    preset = SMALL_TASKS if args.preset == "small" else TASKS
    tasks = {name: dict(preset[name]) for name in args.tasks}
    # part of each run's key: another setting (or a changed library default) means other
    # runs, never overwrites
    energy = laser_fx.LaserConfig().energy if args.energy is None else args.energy
    for spec in tasks.values():
        spec["energy"] = energy
        if args.steps is not None:
            spec["steps"] = args.steps
        for opt in ("target_cosine", "recalibrate_every", "grad_cycles"):
            if getattr(args, opt) is not None:  # absent otherwise: earlier runs' keys stay valid
                spec[opt] = getattr(args, opt)
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    command = "PYTHONPATH=. .venv/bin/python " + shlex.join(["examples/trm/experiment.py", *given])
    seeds = list(range(args.seeds))
    if args.report_only:
        print(write_report(args.out_dir, tasks, seeds, command))
        return 0
    out = run_experiment(args.out_dir, tasks, seeds, jobs=args.jobs, threads=args.threads,
                         command=command, git_root=args.git_root)
    print(f"ran {out['ran']}, skipped {out['skipped']}; report: {out['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
