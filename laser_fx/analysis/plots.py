"""PNG plots of an `Analysis` (matplotlib, imported only when plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .report import Analysis

__all__ = ["plot_analysis"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError(
            "Plotting the analysis needs matplotlib, which is not installed. Install the "
            "`examples` extra (pip install 'laser-fx[examples]') or matplotlib itself."
        ) from e
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def plot_analysis(an: Analysis, out_dir: Path, prefix: str) -> list[Path]:
    """Write four PNGs: spectra, effective rank vs step, tracking error vs step, memory.

    Args:
        an: the analysis.
        out_dir: folder for the files.
        prefix: file name prefix (``<prefix>_spectra.png``, ...).

    Returns:
        The written paths.
    """
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    ranked = an.ranked()
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in ranked:  # last recorded use: the state backward sees last
        sv = s.steps[-1]["singular_values"]
        top = sv[0] if sv and sv[0] > 0 else 1.0
        ax.semilogy([(i + 1) / s.width for i in range(len(sv))], [v / top for v in sv],
                    label=s.key if len(ranked) <= 12 else None, lw=1)
    ax.set(xlabel="index / width", ylabel="singular value / largest",
           title=f"{an.model}: spectra (last grad-enabled use)")
    if len(ranked) <= 12:
        ax.legend(fontsize=6)
    paths.append(_save(fig, plt, out_dir / f"{prefix}_spectra.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in ranked:
        ax.plot(range(len(s.steps)), [st["erank99_frac"] for st in s.steps], marker="o", ms=3,
                label=s.key if len(ranked) <= 12 else None, lw=1)
    ax.set(xlabel="recursion step (grad-enabled use)", ylabel="99%-energy rank / width",
           ylim=(0, 1.05), title=f"{an.model}: effective rank vs step")
    if len(ranked) <= 12:
        ax.legend(fontsize=6)
    paths.append(_save(fig, plt, out_dir / f"{prefix}_erank.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for it, style in (("1", "-"), ("2", "--")):
        for s in ranked:
            gaps = [t["energy_gap"] for t in s.tracking.get(it, [])]
            if len(gaps) > 1:
                ax.plot(range(1, len(gaps)), [max(g, 1e-12) for g in gaps[1:]], style, lw=1,
                        label=f"{s.key} ({it} it)" if len(ranked) <= 6 else None)
    ax.set_yscale("log")
    ax.set(xlabel="recursion step", ylabel="energy lost vs exact top-k (fraction)",
           title=f"{an.model}: power-iteration tracking (solid 1 it, dashed 2 it)")
    if len(ranked) <= 6:
        ax.legend(fontsize=6)
    paths.append(_save(fig, plt, out_dir / f"{prefix}_tracking.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    mem = {**{f"{k} (linear)": v for k, v in an.extra.get("memory_linear", {}).items()},
           **{f"{k} ({v['mechanism']})": v for k, v in an.memory.items()}}
    names = [k for k, v in mem.items() if v.get("saved") is not None]
    ax.barh(range(len(names)), [100 * mem[k]["saved"] for k in names])
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set(xlabel="% of stored bytes saved", xlim=(0, 100),
           title=f"{an.model}: memory saved per site (default config)")
    paths.append(_save(fig, plt, out_dir / f"{prefix}_memory.png"))
    return paths


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
