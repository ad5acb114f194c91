"""Memory-time frontier: LASER's mechanisms against exact activation checkpointing.

For each model (TRM attention, TRM ``mlp_t`` at the TRM experiment's size, ALBERT) every
configuration is measured in one run, its timed steps interleaved with the others': uncompressed;
``torch.utils.checkpoint`` (non-reentrant) around each recursion step; LASER ``mode="linear"``,
``"region"`` and ``"auto"`` (the default: a compressed checkpoint of each shared-block call, i.e.
LASER combined with checkpointing, only compressed checkpoints kept); and LASER linear applied to
the torch-checkpointed model. On a CUDA device (``--device cuda``) each arm's timed steps
also count the operations that make the host wait for the device (``host syncs / step``, by
calling line: `benchmarks._common.host_syncs`). Each arm but the uncompressed one is a deep copy of the model
(same weights); a LASER arm is that copy compressed in place. Prints one markdown table per model, appends JSON lines to
``--out`` as each model finishes, and plots the frontier. About 5 minutes on 2 CPU cores:

    PYTHONPATH=. python benchmarks/frontier.py [--reps 5] [--threads 1] [--device cpu]

The compiled section (every configuration under ``torch.compile``, with torch's
``activation_memory_budget`` too) is benchmarks/compiled.py; ``--compiled`` runs it, with its
own options (``benchmarks/frontier.py --compiled --d 128 --out results/compiled.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import laser_fx

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (  # noqa: E402
    albert_workload,
    build_arms,
    machine,
    measure_arms,
    sync_sources,
    trm_workload,
)

__all__ = ["GOALS", "goal_marks", "main", "markdown_table", "write_jsonl"]

MODELS = ("trm-attn", "trm-mlp_t", "albert")
AUTO = "LASER auto (default) = LASER + checkpointing"
#: the issue's must-show goals for the default config (= LASER + checkpointing)
GOALS = {"memory": 0.40, "memory_aim": 0.25, "time": 1.10, "tracker": 0.05,
         "combo_memory": 0.05, "combo_time": 1.40}


def goal_marks(row: dict[str, Any], ckpt: dict[str, Any]) -> str:
    """The issue's goals checked on the default LASER row (``ok`` / ``MISSED`` each)."""
    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    out = [f"mem<=0.40x {mark(row['memory_ratio'] <= GOALS['memory'])}"]
    if "time_ratio" in row:
        out.append(f"time<=1.10x {mark(row['time_ratio'] <= GOALS['time'])}")
        out.append(f"time<=1.40x {mark(row['time_ratio'] <= GOALS['combo_time'])}")
    if "tracker_share" in row:
        out.append(f"tracker<=5% {mark(row['tracker_share'] <= GOALS['tracker'])}")
    out.append(f"mem<=0.05x {mark(row['memory_ratio'] <= GOALS['combo_memory'])}")
    out.append("mem<torch ckpt "
               + mark(row["after_forward_bytes"] < ckpt["after_forward_bytes"]))
    return ", ".join(out)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One row per configuration: memory, peak, step time (median [IQR]), cosine, tracker."""
    mib = 2.0**20
    ckpt = next(r for r in rows if r["arm"] == "torch checkpoint")
    syncs = any("host_syncs_per_step" in r for r in rows)  # measured on CUDA devices
    lines = ["| configuration | act. memory | peak | step time, median [IQR] | time ratio "
             "| grad cosine | tracker share | goals |" + (" host syncs / step |" if syncs else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if syncs else "")]
    for r in rows:
        t = (f"{r['step_ms']:.0f} ms [{r['q25_ms']:.0f}-{r['q75_ms']:.0f}]"
             if "step_ms" in r else "-")
        lines.append(
            f"| {r['arm']} | {r['memory_ratio']:.3f}x ({r['after_forward_bytes'] / mib:.1f} MiB)"
            f" | {r['peak_ratio']:.3f}x ({r['peak_bytes'] / mib:.1f} MiB) | {t} | "
            f"{r.get('time_ratio', float('nan')):.2f}x | {r['grad_cosine']:.5f} | "
            + (f"{100 * r['tracker_share']:.1f}%" if "tracker_share" in r else "-")
            + f" | {goal_marks(r, ckpt) if r['arm'] == AUTO else ''} |"
            + (f" {r['host_syncs_per_step']:.1f} |" if "host_syncs_per_step" in r else
               " - |" if syncs else ""))
    for r in rows:
        if sync_sources(r):
            lines.append(f"\n{r['arm']}: host syncs per step from {sync_sources(r)}")
    return "\n".join(lines)


def write_jsonl(path: str | None, script: str, record: dict[str, Any], *, fresh: bool) -> None:
    """Append ``record`` (tagged with ``script``) to the JSON-lines file ``path``.

    With ``fresh``, earlier records of the same script are dropped first, so a rerun replaces
    them while the other script's records stay.
    """
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if fresh and p.exists():
        keep = [ln for ln in p.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("script") != script]
        p.write_text("".join(ln + "\n" for ln in keep))
    with p.open("a") as f:
        f.write(json.dumps({"script": script, **record}) + "\n")


def _plot(records: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"uncompressed": "s", "torch checkpoint": "D", "LASER linear": "v",
               "LASER region": "^", AUTO: "*", "LASER linear inside torch checkpoint": "x"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for i, rec in enumerate(records):
        color = f"C{i}"
        for r in rec["rows"]:
            if "time_ratio" not in r:
                continue
            for ax, key in zip(axes, ("memory_ratio", "peak_ratio"), strict=True):
                ax.scatter(r["time_ratio"], r[key], color=color, marker=markers.get(r["arm"], "o"),
                           s=90 if r["arm"] == AUTO else 40)
        axes[0].plot([], [], color=color, label=rec["workload"])
    for arm, m in markers.items():
        axes[1].scatter([], [], color="gray", marker=m, label=arm)
    for ax, what in zip(axes, ("activation memory after forward", "peak over fwd+bwd"),
                        strict=True):
        ax.set_yscale("log")
        ax.set_xlabel("step time / uncompressed")
        ax.set_ylabel(f"{what} / uncompressed")
        ax.axvline(1.10, ls=":", color="gray")
        ax.axhline(0.40 if what.startswith("act") else 1.0, ls=":", color="gray")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle("LASER vs activation checkpointing (lower left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _workload(name: str, a: argparse.Namespace):
    if name == "albert":
        return albert_workload(layers=a.albert_layers, batch=a.albert_batch, seq=a.albert_seq)
    return trm_workload(mixer=name.split("-", 1)[1], d=a.d, n=a.n, T=a.T, batch=a.batch)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--d", type=int, default=64, help="TRM width D")
    p.add_argument("--n", type=int, default=3, help="TRM recursion steps per cycle")
    p.add_argument("--T", type=int, default=2, help="TRM cycles (first T-1 without grad)")
    p.add_argument("--batch", type=int, default=64, help="TRM batch")
    p.add_argument("--albert-layers", type=int, default=6)
    p.add_argument("--albert-batch", type=int, default=16)
    p.add_argument("--albert-seq", type=int, default=32)
    p.add_argument("--reps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/benchmarks.jsonl", help="JSON lines ('' : none)")
    p.add_argument("--plot", default="results/benchmarks_frontier.png", help="PNG ('' : none)")
    p.add_argument("--compiled", action="store_true",
                   help="run the compiled section instead (benchmarks/compiled.py; the other "
                   "options are its own, see benchmarks/compiled.py --help)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns one record per model (``workload``, ``rows``, ``notes``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--compiled" in argv:  # the compiled section takes options of its own
        from benchmarks.compiled import main as compiled_main

        return compiled_main([x for x in argv if x != "--compiled"])
    a = _parse(argv)
    torch.set_num_threads(a.threads)
    print(f"machine: {machine()}; device {a.device}")
    records: list[dict[str, Any]] = []
    for name in a.models:
        w = _workload(name, a)
        try:
            arms, notes = build_arms(w, device=a.device)
            rows = measure_arms(w, arms, reps=a.reps, device=a.device)
        except (RuntimeError, laser_fx.LaserFxError) as e:
            # report the model as not measured (e.g. out of memory on the device), go on
            print(f"\n### {w.name}\n\nnot measured on {a.device}: {str(e).splitlines()[0]}")
            continue
        rec = {"workload": w.name, "model": name, "args": vars(a), "machine": machine(),
               "rows": rows, "notes": notes}
        records.append(rec)
        write_jsonl(a.out, "frontier", rec, fresh=not records[:-1])
        print(f"\n### {w.name}\n\n{markdown_table(rows)}")
        for label, why in notes.items():
            print(f"\n{label}: not measured ({why})")
        sys.stdout.flush()
    if a.plot:
        _plot(records, a.plot)
        print(f"\nplot: {a.plot}")
    return records


if __name__ == "__main__":
    main()
