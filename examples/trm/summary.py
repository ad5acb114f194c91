"""How `train.py`'s results read: the printed summary, the results files and the plot.

`summarize` turns `train.run`'s result into the text `train.py` prints; `write_results`
writes the result as JSON, that text as markdown (with the command that made it) and
`plot`'s bar chart of memory per arm and setting beside it. `ratios` is the one figure
both sides share: how one arm's memory and step time compare with another's.

Nothing here trains or measures; everything reads the JSON-ready dict `train.run` returns,
so a saved ``results/*.json`` can be summarized again without re-running it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import laser_fx

__all__ = ["LABELS", "plot", "ratios", "summarize", "write_results"]

LABELS = {"baseline": "uncompressed", "checkpoint": "torch checkpoint", "laser": "laser_fx"}


def ratios(arms: dict[str, dict[str, Any]], num: str, den: str) -> dict[str, float] | None:
    """Arm ``num`` over arm ``den``: activation bytes, peak bytes, median step time (None if
    either arm was not run)."""
    if num not in arms or den not in arms:
        return None
    a, b = arms[num], arms[den]
    return {"activation": a["activation_bytes"] / max(b["activation_bytes"], 1),
            "peak": a["peak_bytes"] / max(b["peak_bytes"], 1),
            "step_time": a["step_time_median_s"] / b["step_time_median_s"]}


def _fmt_mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def _setting_line(s: dict[str, int]) -> str:
    through = "the last cycle" if s["grad_cycles"] == 1 else (
        f"all {s['T']} cycles" if s["grad_cycles"] == s["T"] else
        f"the last {s['grad_cycles']} cycles")
    return (f"n={s['n']}, T={s['T']}, gradient through {through}:"
            f" {s['grad_calls']} grad-enabled block calls")


def _laser_line(block: dict[str, Any], config: dict[str, Any]) -> str:
    """What the LASER arm stored: its ranks, or why it stored the block inputs exactly."""
    t = block["laser_report"]["totals"]
    kept = (f"; kept {_fmt_mib(t['stored_bytes'])} for backward where the same calls keep"
            f" {_fmt_mib(t['dense_bytes'])} uncompressed ({t['ratio']:.3f}x)"
            if t["ratio"] is not None else "")
    slots = block["laser_ranks"]
    if any(rank > 0 for site in slots.values() for _, rank in site.values()):
        ranks = "; ".join(
            f"{name} inputs: rank {', '.join(str(r) for _, r in site.values())} of width"
            f" {'/'.join(sorted({str(w) for w, _ in site.values()}))}"
            for name, site in slots.items())
        return f"laser_fx stores low-rank bases ({ranks}){kept}"
    if config.get("rank") is not None:
        why = f"at rank {config['rank']} the coefficients would not be smaller than the inputs"
    else:
        energy = config.get("energy") or laser_fx.LaserConfig().energy
        why = f"at energy {energy} they need more than 3/4 of the width"
    return (f"laser_fx stores these block inputs exactly (rank 0): {why}; it equals torch"
            f" checkpoint here{kept}")


def _table(arms: dict[str, dict[str, Any]], trained: bool) -> list[str]:
    lines = [f"    {'arm':<17} {'act. memory':>11} {'peak':>10} {'step':>7}"
             + (f" {'exact/token':>13}" if trained else "")]
    for name, a in arms.items():
        acc = ""
        if trained:
            raw = a["eval"]["raw"]
            acc = f"{raw['exact_acc']:.1%}/{raw['token_acc']:.1%}"
        lines.append(f"    {LABELS[name]:<17} {_fmt_mib(a['activation_bytes']):>11}"
                     f" {_fmt_mib(a['peak_bytes']):>10} {a['step_time_median_s'] * 1e3:>5.0f}ms"
                     f" {acc:>13}".rstrip())
    return lines


def _vs_lines(block: dict[str, Any]) -> list[str]:
    lines = []
    arms = block["arms"]
    for name in ("checkpoint", "laser"):
        r = ratios(arms, name, "baseline")
        if r is not None:
            lines.append(f"    {LABELS[name]} / uncompressed: activation memory"
                         f" {r['activation']:.3f}x, peak {r['peak']:.2f}x,"
                         f" step time {r['step_time']:.2f}x")
    r = block.get("vs_checkpoint")
    if r is not None:
        lines.append(f"    laser_fx / torch checkpoint: activation memory {r['activation']:.2f}x,"
                     f" peak {r['peak']:.2f}x, step time {r['step_time']:.2f}x")
    return lines


def summarize(result: dict[str, Any]) -> str:
    """A readable summary of `run`'s result: per seed, one block of rows per setting."""
    c = result["config"]
    lines = [
        f"TRM {c['task']} {c['size']}x{c['size']}, mixer {c['mixer']}, D={c['d']}, batch"
        f" {c['batch']}, ACT max {c['max_sup_steps']}; arms from the same initial weights, same"
        " batches, steps interleaved",
        "memory: one training step on the same batch (act. memory: kept for backward after"
        " the forward; peak: over forward and backward); step: median step time;"
        f" accuracy on {c['n_test']} held-out puzzles, raw weights",
    ]
    for r in result["runs"]:
        lines.append(f"seed {r['seed']}:")
        lines.append(f"  {_setting_line(r['setting'])}; trained {r['steps_done']} steps in"
                     f" {r['train_seconds']:.0f} s")
        lines += _table(r["arms"], trained=True)
        lines += _vs_lines(r)
        if "laser_report" in r:
            lines.append(f"    {_laser_line(r, c)}")
            lines.append(f"    laser_fx.compress (in place: probe run, swap, one check run):"
                         f" {r['compress_seconds']:.2f} s")
        deep = r.get("deeper")
        if deep is not None:
            lines.append(f"  deeper: {_setting_line(deep['setting'])}; the trained weights,"
                         f" {deep['steps']} lockstep steps measured (not trained, no accuracy)")
            lines += _table(deep["arms"], trained=False)
            lines += _vs_lines(deep)
            if "laser_report" in deep:
                lines.append(f"    {_laser_line(deep, c)}")
    if "run_seconds" in result:
        lines.append(f"whole run (data, training, evaluation, measurements):"
                     f" {result['run_seconds']:.0f} s")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Bar chart of after-forward and peak memory per arm and setting (first seed); ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result["runs"][0]
    blocks = [(r["setting"], r["arms"])]
    if "deeper" in r:
        blocks.append((r["deeper"]["setting"], r["deeper"]["arms"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = list(r["arms"])
    width = 0.8 / len(names)
    for ax, key, title in zip(axes, ("activation_bytes", "peak_bytes"),
                              ("kept for backward after the forward", "peak over the step"),
                              strict=True):
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(blocks))]
            ys = [arms[name][key] / 2**20 for _, arms in blocks]
            bars = ax.bar(xs, ys, width, label=LABELS[name])
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(blocks)),
                      [f"{s['grad_calls']} grad calls\n(n={s['n']}, T={s['T']}, grad"
                       f" {s['grad_cycles']})" for s, _ in blocks])
        ax.set(title=title, ylabel="MiB (log scale)", yscale="log")
        ax.legend()
    c = result["config"]
    fig.suptitle(f"TRM {c['task']} {c['size']}x{c['size']}, {c['mixer']}, D={c['d']},"
                 f" batch {c['batch']}: one training step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(result: dict[str, Any], text: str, out: Path, argv: list[str]) -> list[Path]:
    """The JSON, the summary (.md, with the command and the plot) and the plot (.png)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    png = plot(result, out.with_suffix(".png"))
    md = out.with_suffix(".md")
    command = " ".join(["python examples/trm/train.py", *argv])
    md.write_text(f"# TRM: uncompressed, torch checkpoint and laser_fx\n\nCommand: `{command}`"
                  f" (torch {result['torch']}, {result['device_name']}).\n\n```\n{text}\n```\n\n"
                  f"![memory per arm and setting]({png.name})\n")
    return [out, md, png]
