"""Scaling with recursion depth and width: TRM activation memory and step time vs n and D.

Three configurations per point, measured in one run with their timed steps interleaved:
uncompressed, ``torch.utils.checkpoint`` (non-reentrant) around each recursion step, and LASER's
default (``mode="auto"``, compressed checkpoints). Memory is measured at every point; time with
``--reps`` steps up to width 256 and ``--big-reps`` above. The bytes kept per recursion step are
the least-squares slope of activation bytes against n, for each configuration. About 6 minutes
on 2 CPU cores:

    PYTHONPATH=. python benchmarks/scaling.py [--reps 3] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import build_arms, machine, measure_arms, trm_workload  # noqa: E402
from benchmarks.frontier import AUTO, write_jsonl  # noqa: E402

__all__ = ["fit_slope", "main"]

ARMS = ("uncompressed", "torch checkpoint", AUTO)
#: the issue's goal: LASER's bytes per recursion step <= 0.40x the baseline's
SLOPE_GOAL = 0.40


def fit_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares line through ``(xs, ys)``.

    Returns:
        ``(slope, intercept)``.
    """
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(slope), float(intercept)


def _point(a: argparse.Namespace, d: int, n: int) -> list[dict[str, Any]]:
    w = trm_workload(mixer=a.mixer, d=d, n=n, T=a.T, batch=a.batch)
    arms, _ = build_arms(w, modes=(AUTO,), combo=False, device=a.device)
    reps = a.reps if d <= 256 else a.big_reps
    return measure_arms(w, arms, reps=reps, device=a.device, tracker_reps=1)


def _table(points: list[dict[str, Any]], key: str) -> str:
    mib = 2.0**20
    lines = [f"| {key} | uncompressed | torch checkpoint | LASER default | LASER / uncompressed "
             "| time: torch ckpt / LASER (x uncompressed) |", "|---|---|---|---|---|---|"]
    for pt in points:
        r = {row["arm"]: row for row in pt["rows"]}
        base, ck, la = r["uncompressed"], r["torch checkpoint"], r[AUTO]
        t = (f"{ck['time_ratio']:.2f}x / {la['time_ratio']:.2f}x"
             if "time_ratio" in la else "-")
        lines.append(f"| {pt[key]} | {base['after_forward_bytes'] / mib:.2f} MiB | "
                     f"{ck['after_forward_bytes'] / mib:.2f} MiB | "
                     f"{la['after_forward_bytes'] / mib:.2f} MiB | {la['memory_ratio']:.3f}x | "
                     f"{t} |")
    return "\n".join(lines)


def _slopes(points: list[dict[str, Any]]) -> dict[str, float]:
    ns = [pt["n"] for pt in points]
    out = {}
    for arm in ARMS:
        ys = [next(r for r in pt["rows"] if r["arm"] == arm)["after_forward_bytes"]
              for pt in points]
        out[arm] = fit_slope(ns, ys)[0]
    return out


def _plot(n_points: list[dict], d_points: list[dict], slopes: dict[str, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"uncompressed": "uncompressed", "torch checkpoint": "torch checkpoint",
              AUTO: "LASER default (auto)"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for arm, label in labels.items():
        for ax, pts, key in ((axes[0], n_points, "n"), (axes[1], d_points, "d")):
            rows = [next(r for r in pt["rows"] if r["arm"] == arm) for pt in pts]
            ax.plot([pt[key] for pt in pts], [r["after_forward_bytes"] / 2**20 for r in rows],
                    "o-", label=f"{label}" + (f" ({slopes[arm] / 2**20:.2f} MiB/step)"
                                              if key == "n" else ""))
        timed = [(pt["n"], next(r for r in pt["rows"] if r["arm"] == arm)) for pt in n_points]
        timed = [(n, r["step_ms"]) for n, r in timed if "step_ms" in r]
        if timed:
            axes[2].plot(*zip(*timed, strict=True), "o-", label=label)
    axes[0].set(xlabel="recursion steps n", ylabel="activation memory (MiB)", yscale="log")
    axes[1].set(xlabel="width D", ylabel="activation memory (MiB)", yscale="log", xscale="log")
    axes[2].set(xlabel="recursion steps n", ylabel="step time (ms, median)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixer", choices=("attn", "mlp_t"), default="attn")
    p.add_argument("--n-values", type=int, nargs="+", default=[2, 4, 6, 8, 12, 16])
    p.add_argument("--n-width", type=int, default=128, help="D of the n sweep")
    p.add_argument("--d-values", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--d-depth", type=int, default=6, help="n of the D sweep")
    p.add_argument("--T", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=3, help="timed steps per point (D <= 256)")
    p.add_argument("--big-reps", type=int, default=1, help="timed steps per point (D > 256)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/benchmarks.jsonl", help="JSON lines ('' : none)")
    p.add_argument("--plot", default="results/benchmarks_scaling.png", help="PNG ('' : none)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run both sweeps; returns ``{"n": points, "d": points, "slopes": ..., "slope_ratio": ...}``."""
    a = _parse(argv)
    torch.set_num_threads(a.threads)
    print(f"machine: {machine()}; device {a.device}; TRM {a.mixer}, T={a.T}, batch {a.batch}")
    n_points: list[dict[str, Any]] = []
    d_points: list[dict[str, Any]] = []
    first = True
    for sweep, values in (("n", a.n_values), ("d", a.d_values)):
        for v in values:
            d, n = (a.n_width, v) if sweep == "n" else (v, a.d_depth)
            pt = {"sweep": sweep, "n": n, "d": d, "rows": _point(a, d, n)}
            (n_points if sweep == "n" else d_points).append(pt)
            write_jsonl(a.out, "scaling", {"args": vars(a), "machine": machine(), **pt},
                        fresh=first)
            first = False
            la = next(r for r in pt["rows"] if r["arm"] == AUTO)
            print(f"  {sweep} point: D={d} n={n}: LASER {la['memory_ratio']:.3f}x memory, "
                  f"{la.get('time_ratio', float('nan')):.2f}x time", flush=True)
    slopes = _slopes(n_points) if len(n_points) >= 2 else {}
    ratio = slopes[AUTO] / slopes["uncompressed"] if slopes else float("nan")
    print(f"\n### vs recursion depth n (D={a.n_width})\n\n{_table(n_points, 'n')}")
    print(f"\n### vs width D (n={a.d_depth})\n\n{_table(d_points, 'd')}")
    if slopes:
        print("\nbytes per recursion step (least-squares slope over n): "
              + ", ".join(f"{k.split(' =')[0]} {v / 2**20:.3f} MiB" for k, v in slopes.items()))
        print(f"LASER / uncompressed slope: {ratio:.3f}x (goal <= {SLOPE_GOAL:.2f}x: "
              f"{'ok' if ratio <= SLOPE_GOAL else 'MISSED'})")
        write_jsonl(a.out, "scaling", {"slopes": slopes, "slope_ratio": ratio}, fresh=False)
    if a.plot and n_points and d_points:
        _plot(n_points, d_points, slopes, a.plot)
        print(f"\nplot: {a.plot}")
    return {"n": n_points, "d": d_points, "slopes": slopes, "slope_ratio": ratio}


if __name__ == "__main__":
    main()
