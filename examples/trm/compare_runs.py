"""Paired comparison of two experiment runs (e.g. ``--grad-cycles 1`` vs ``2``), seed by seed.

Seed k of both runs starts from the same initial weights and sees the same batches, so each
arm's exact accuracy is paired by seed across the runs (`experiment.paired_difference`).

Usage (from the repository root)::

    PYTHONPATH=. python examples/trm/compare_runs.py results/trm_calibrated/trm_runs.jsonl \\
        results/trm_calibrated/grad_cycles2/trm_runs.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.trm.experiment import load_runs, paired_difference

__all__ = ["compare", "main"]


def _exact(path: Path) -> dict[tuple[str, str], dict[int, float]]:
    """``{(task, arm): {seed: exact accuracy}}`` of a run's JSONL file."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    for line in load_runs(path):
        for run in line["result"]["runs"]:
            for arm, a in run["arms"].items():
                out.setdefault((line["task"], arm), {})[line["seed"]] = a["eval"]["raw"]["exact_acc"]
    return out


def compare(first: Path, second: Path) -> list[dict[str, Any]]:
    """Per (task, arm) present in both files with >= 2 common seeds: the paired difference
    of exact accuracy, second minus first, in points."""
    a, b = _exact(first), _exact(second)
    rows = []
    for key in sorted(set(a) & set(b)):
        seeds = sorted(set(a[key]) & set(b[key]))
        if len(seeds) < 2:
            continue
        x, y = [a[key][s] for s in seeds], [b[key][s] for s in seeds]
        mean, lo, hi, p = paired_difference(x, y)
        rows.append({"task": key[0], "arm": key[1], "seeds": len(seeds),
                     "diff": 100 * mean, "low": 100 * lo, "high": 100 * hi, "p": p})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", type=Path, help="trm_runs.jsonl of the reference run")
    p.add_argument("second", type=Path, help="trm_runs.jsonl of the other run")
    args = p.parse_args(argv)
    print("| task | arm | seeds | second - first, exact points [95% CI] | paired p |")
    print("|---|---|---|---|---|")
    for r in compare(args.first, args.second):
        print(f"| {r['task']} | {r['arm']} | {r['seeds']} | {r['diff']:+.2f} "
              f"[{r['low']:+.2f}, {r['high']:+.2f}] | {r['p']:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
