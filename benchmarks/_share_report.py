"""The Markdown of benchmarks/tracker_share.py: the issue's goals, the tables (per mode, by
phase, per tracker, by role) and the report file around them."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Sequence
from typing import Any

from benchmarks._tracker_probe import PHASES

__all__ = ["COLUMNS", "GOALS", "SITE_COLUMNS", "markdown_table", "phase_table", "report",
           "role_table", "site_table"]

#: issue 15's eager goals: largest tracker share of the step per mode (at D >= 128), and the
#: largest tracker / ideal ratio in every mode
GOALS = {"share": {"auto": 0.02, "region": 0.10, "linear": 0.05}, "ratio": 2.0, "min_d": 128}
SITE_COLUMNS = ("mode", "D", "site:slot@role", "width", "rank (end)", "calls/step",
                "power updates/step", "resets/step", "tracker ms/step",
                "share of the mode's tracker time")
COLUMNS = ("mode", "D", "step ms [IQR]", "tracker ms/step", "tracker share [IQR]",
           "ideal ms/step", "tracker / ideal", "compress calls/step", "resets/step",
           "power updates/step", "refinements/step: first call of the step / later calls",
           "at once/step", "host reads/step in trackers (whole step)", "goals")


def _goal_marks(row: dict[str, Any]) -> str:
    if row["D"] < GOALS["min_d"]:
        return "-"
    share_goal = GOALS["share"][row["mode"]]
    marks = [f"share<={100 * share_goal:.0f}% "
             + ("ok" if row["tracker_share"] <= share_goal else "MISSED")]
    if row["ratio"] is not None:
        marks.append(f"ratio<={GOALS['ratio']:.0f}x "
                     + ("ok" if row["ratio"] <= GOALS["ratio"] else "MISSED"))
    return ", ".join(marks)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per (mode, D) with the `COLUMNS`."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.1f}x"
        lines.append(
            f"| {r['mode']} | {r['D']} | {r['step_ms']:.0f} [{r['q25_ms']:.0f}-{r['q75_ms']:.0f}]"
            f" | {r['tracker_ms']:.1f} | {100 * r['tracker_share']:.1f}% "
            f"[{100 * r['share_q25']:.1f}-{100 * r['share_q75']:.1f}] | {r['ideal_ms']:.2f} | "
            f"{ratio} | {r['calls']:.1f} | {r['resets']:.1f} | {r['power_updates']:.1f} | "
            f"{r['first_refines']:.1f} / {r['later_refines']:.1f} | {r['at_once']:.1f} | "
            f"{r['host_reads']:.0f} ({r['all_reads']:.0f}) | {_goal_marks(r)} |")
    return "\n".join(lines)


def site_table(rows: list[dict[str, Any]]) -> str:
    """One line per tracker with the `SITE_COLUMNS`."""
    lines = ["| " + " | ".join(SITE_COLUMNS) + " |", "|" + "---|" * len(SITE_COLUMNS)]
    lines += [f"| {r['mode']} | {r['D']} | {r['site']} | {r['width']} | {r['rank']} | "
              f"{r['calls']:.1f} | {r['power_updates']:.1f} | {r['resets']:.1f} | "
              f"{r['ms']:.2f} | {100 * r['share']:.1f}% |" for r in rows]
    return "\n".join(lines)


def role_table(rows: list[dict[str, Any]]) -> str:
    """The per-tracker rows summed by mode, D and role (a call site of the user's code: the
    ``@`` suffix of the tracker's name)."""
    roles: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        roles.setdefault((r["mode"], r["D"], r["site"].rpartition("@")[2]), []).append(r)
    lines = ["| mode | D | role | trackers | calls/step | power updates/step | "
             "share of the mode's tracker time |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {mode} | {d} | @{role} | {len(rs)} | {sum(r['calls'] for r in rs):.1f} | "
              f"{sum(r['power_updates'] for r in rs):.1f} | "
              f"{100 * sum(r['share'] for r in rs):.1f}% |"
              for (mode, d, role), rs in roles.items()]
    return "\n".join(lines)


def phase_table(rows: list[dict[str, Any]]) -> str:
    """One line per (mode, D) with its tracker time by phase (means per step) and the
    steady state's two products (projection and reconstruction) against the ideal."""
    names = (*PHASES, "other")
    lines = ["| mode | D | " + " | ".join(f"{p} ms/step" for p in names)
             + " | tracker ms/step (mean) | (projection + reconstruction) / ideal |",
             "|" + "---|" * (len(names) + 4)]
    for r in rows:
        ph = r["phases_ms"]
        steady = ph["projection"] + ph["reconstruction"]
        ratio = f"{steady / r['ideal_mean_ms']:.1f}x" if r["ideal_mean_ms"] > 0 else "-"
        lines.append(f"| {r['mode']} | {r['D']} | "
                     + " | ".join(f"{ph[p]:.2f}" for p in names)
                     + f" | {sum(ph.values()):.2f} | {ratio} |")
    return "\n".join(lines)


def report(a: argparse.Namespace, cmd: str, where: str, names: Sequence[str],
           rows: list[dict[str, Any]], sites: list[dict[str, Any]]) -> str:
    """The Markdown file of a run: the command, machine, models, methods and the tables
    (by phase with ``--phases``, per tracker and by role with ``--per-site``)."""
    return "\n\n".join([
        "# Tracker share of an eager training step (issue 15)",
        f"`{cmd}` ({datetime.date.today()})",
        f"Machine: {where}; device {a.device}." + (f" {a.note}" if a.note else ""),
        f"Models: {'; '.join(names)}; AdamW lr {a.lr:g} between steps; {a.warmup} warm-up "
        f"step(s) skipped, {a.steps} measured per mode, modes interleaved"
        + (f"; LaserConfig({', '.join(a.config)})" if a.config else "")
        + ("; the accelerator's decision path (--defer-refinements)."
           if a.defer_refinements else "."),
        "Step: forward + backward (optimizer step not timed). Tracker: time inside "
        "`SubspaceTracker` compress/decompress/settle/end_forward (outermost calls). "
        "Ideal: `X @ Q` + "
        "`C @ Qᵀ` for every compress call's shapes (fp32, dense records 0). Medians over "
        "steps [IQR]; counts are means per step; host reads: `item`/`__float__`/`__int__`/"
        "`__bool__`/`__index__`/`tolist` inside tracker methods (whole step); at once: "
        "refinements, resets and first bases built with values read back at once.",
        markdown_table(rows),
        *(["## By phase", "Means per measured step (`benchmarks._tracker_probe.PHASES`): "
           "the steady state's projection (centering, `X Q`, energies), the "
           "reconstruction for backward (`C Qᵀ`), bases built or refined, and the rest of "
           "the tracker calls (decisions, records, centering again for a refinement); the "
           "last column sets the two products the ideal times, as a step runs them, "
           "against it.", phase_table(rows)] if a.phases else []),
        *(["## Per tracker", "Means per measured step; rank at the end of the run; share: "
           "of the mode's tracker time.", site_table(sites), "By role:",
           role_table(sites)] if sites else []),
        ""])
