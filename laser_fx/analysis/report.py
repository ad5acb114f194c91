"""`Analysis`: per-site, per-use statistics, the claim checks, and the Markdown report."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Analysis", "SiteAnalysis", "write_markdown"]

#: claim thresholds (ours: the paper states its claims qualitatively)
LOW_DIM_FRAC = 0.5  # (a) median site keeps 99% energy with at most half its width
TRACK_GAP = 0.01  # (b) 1 power iteration loses at most 1% energy vs the optimal rank-k basis
SPREAD = 2.0  # (c) max/min of the 99%-energy rank fraction across site slots


@dataclass
class SiteAnalysis:
    """One site slot (an op site, or one argument of a module site).

    Attributes:
        key: ``site`` or ``site[slot]``.
        site, kind, slot, width: as in `Capture`.
        calls: calls in the forward (grad-enabled or not); ``uses``: index in ``Site.uses`` of
            each recorded (grad-enabled) call.
        steps: per recorded use: ``rows``, ``singular_values``, ``erank90``, ``erank99``,
            ``participation_ratio`` (and each as ``*_frac`` of width), ``rank_k_energy``
            (aligned with `Analysis.ks`), and against the previous recorded use:
            ``drift_max_deg`` (largest principal angle between the top-k subspaces, per k)
            and ``prev_basis_energy`` (energy the previous top-k basis keeps, per k); None
            at the first step.
        track_rank: rank tracked in ``tracking`` (99%-energy rank of the first use).
        tracking: ``{"1": [...], "2": [...]}`` per power-iteration count, `track_subspace`.
        tracker: `replay_tracker` at the analysis config.
    """

    key: str
    site: str
    kind: str
    slot: int
    width: int
    calls: int
    uses: list[int]
    steps: list[dict[str, Any]]
    track_rank: int
    tracking: dict[str, list[dict[str, float | None]]]
    tracker: dict[str, Any]

    def mean(self, stat: str) -> float:
        """Mean of a per-step statistic over the recorded uses."""
        return statistics.fmean(s[stat] for s in self.steps)


@dataclass
class Analysis:
    """What `laser_fx.analyze` found; `to_dict` is JSON-able, `from_dict` inverts it.

    Attributes:
        model: a label (the model's class name unless given).
        ks: the ranks k of ``rank_k_energy`` / ``drift_max_deg``.
        sites: one `SiteAnalysis` per captured site slot.
        memory: site name -> ``stored_bytes``, ``dense_bytes``, ``saved`` (fraction),
            ``mechanism``, ``rank`` from ``laser_fx.report`` after one training forward of
            the compressed model at ``config``.
        config: the `LaserConfig` used, as a dict.
        notes: site -> caveat (not captured, call-count mismatch, ...).
        extra: free-form (e.g. ``memory_linear`` from mode="linear").
    """

    model: str
    ks: list[int]
    sites: list[SiteAnalysis]
    memory: dict[str, dict[str, Any]]
    config: dict[str, Any]
    notes: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (non-finite floats become None)."""
        return _finite(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Analysis:
        """Rebuild from `to_dict` output (e.g. after a JSON round trip)."""
        sites = [SiteAnalysis(**s) for s in d["sites"]]
        return cls(**{**d, "sites": sites})

    def ranked(self) -> list[SiteAnalysis]:
        """Site slots sorted by mean 99%-energy rank as a fraction of width (most concentrated first)."""
        return sorted(self.sites, key=lambda s: (s.mean("erank99_frac"), s.key))

    def claims(self) -> dict[str, Any]:
        """The paper's three claims, measured here, with the thresholds used.

        Returns:
            ``{"a": {...}, "b": {...}, "c": {...}}``, each with ``holds`` (bool or None
            when not measurable) and the numbers behind it.
        """
        fr99 = [s.mean("erank99_frac") for s in self.sites if s.steps]
        fr90 = [s.mean("erank90_frac") for s in self.sites if s.steps]
        a: dict[str, Any] = {"threshold": LOW_DIM_FRAC, "holds": None}
        if fr99:
            a.update(median_erank99_frac=statistics.median(fr99),
                     median_erank90_frac=statistics.median(fr90),
                     min_erank99_frac=min(fr99), max_erank99_frac=max(fr99))
            a["holds"] = a["median_erank99_frac"] <= LOW_DIM_FRAC
        b: dict[str, Any] = {"threshold": TRACK_GAP, "holds": None}
        for it in ("1", "2"):
            gaps = [t["energy_gap"] for s in self.sites for t in s.tracking.get(it, [])[1:]]
            sins = [t["sin_max"] for s in self.sites for t in s.tracking.get(it, [])[1:]]
            if gaps:
                b[f"median_gap_{it}"] = statistics.median(gaps)
                b[f"max_gap_{it}"] = max(gaps)
                b[f"median_sin_{it}"] = statistics.median(sins)
                b[f"max_sin_{it}"] = max(sins)
        b["extra_resets"] = sum(max(0, s.tracker["resets"] - 1) for s in self.sites)
        b["dense_stores"] = sum(s.tracker["dense_stores"] for s in self.sites)
        b["tracked_steps"] = sum(max(0, len(s.steps) - 1) for s in self.sites)
        if "median_gap_1" in b:
            b["holds"] = b["median_gap_1"] <= TRACK_GAP
        c: dict[str, Any] = {"threshold": SPREAD, "holds": None, "slots": len(fr99)}
        if len(fr99) >= 2 and min(fr99) > 0:
            c["spread"] = max(fr99) / min(fr99)
            c["holds"] = c["spread"] >= SPREAD
        return {"a": a, "b": b, "c": c}


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _verdict(holds: bool | None) -> str:
    return {True: "**holds**", False: "**does not hold**", None: "not measurable"}[holds]


def site_table(an: Analysis) -> list[str]:
    """Markdown table of the site slots sorted by 99%-energy rank fraction."""
    # mid-range ranks say most about concentration at the widths of looped models (32-256)
    k_cols = [k for k in an.ks if 4 <= k <= 32][:4] or an.ks[:4]
    head = ["site slot", "width", "grad uses / calls", "erank90", "erank99", "erank99/width",
            "PR/width", *[f"E(k={k})" for k in k_cols], "drift max° (k=erank99)",
            "1-iter gap", "2-iter gap", "resets", "saved"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in an.ranked():
        drift = [_drift_at(st, an.ks, st["erank99"]) for st in s.steps[1:]]
        drift = [d for d in drift if d is not None]
        gaps = {it: [t["energy_gap"] for t in s.tracking.get(it, [])[1:]] for it in ("1", "2")}
        mem = an.memory.get(s.site)
        saved = f"{mem['saved']:.0%}" if mem and mem.get("saved") is not None else "-"
        row = [f"`{s.key}`", str(s.width), f"{len(s.uses)} / {s.calls}",
               f"{s.mean('erank90'):.1f}", f"{s.mean('erank99'):.1f}",
               f"{s.mean('erank99_frac'):.2f}", f"{s.mean('participation_ratio_frac'):.3f}",
               *[f"{statistics.fmean(st['rank_k_energy'][an.ks.index(k)] for st in s.steps):.3f}"
                 for k in k_cols],
               f"{max(drift):.1f}" if drift else "-",
               f"{max(gaps['1']):.1e}" if gaps["1"] else "-",
               f"{max(gaps['2']):.1e}" if gaps["2"] else "-",
               str(s.tracker["resets"]), saved]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _drift_at(step: dict[str, Any], ks: list[int], k: int) -> float | None:
    """Drift angle at the listed k closest to (not below) ``k``."""
    drifts = step.get("drift_max_deg")
    if drifts is None:
        return None
    for i, kk in enumerate(ks):
        if kk >= k and drifts[i] is not None:
            return drifts[i]
    return next((d for d in reversed(drifts) if d is not None), None)


def claims_lines(an: Analysis) -> list[str]:
    """Markdown bullets stating each claim with its numbers."""
    c = an.claims()
    a, b, cc = c["a"], c["b"], c["c"]
    out = []
    if a["holds"] is not None:
        out.append(
            f"- (a) effectively linear, low-dimensional: {_verdict(a['holds'])}. Median site slot"
            f" keeps 99% of its energy in {a['median_erank99_frac']:.0%} of its width (90%:"
            f" {a['median_erank90_frac']:.0%}); range {a['min_erank99_frac']:.0%}-"
            f"{a['max_erank99_frac']:.0%} (criterion: median <= {LOW_DIM_FRAC:.0%}).")
    if b["holds"] is not None:
        out.append(
            f"- (b) power iterations track the principal directions: {_verdict(b['holds'])}. "
            f"Over {b['tracked_steps']} tracked steps, 1 warm-started iteration loses a median"
            f" {b['median_gap_1']:.1e} (max {b['max_gap_1']:.1e}) of the energy the exact top-k"
            f" keeps, largest-angle sine median {b['median_sin_1']:.2f}; 2 iterations:"
            f" {b['median_gap_2']:.1e} (max {b['max_gap_2']:.1e}), sine {b['median_sin_2']:.2f}."
            f" The default config's tracker needed {b['extra_resets']} resets beyond each"
            f" slot's first call and stored {b['dense_stores']} calls dense"
            f" (criterion: median 1-iteration gap <= {TRACK_GAP:.0%}).")
    else:
        out.append("- (b) not measurable: no slot has two grad-enabled uses.")
    if cc["holds"] is not None:
        out.append(
            f"- (c) concentration varies sharply across sites: {_verdict(cc['holds'])}. "
            f"max/min of the 99%-energy rank fraction over {cc['slots']} site slots ="
            f" {cc['spread']:.1f}x (criterion: >= {SPREAD:.0f}x).")
    else:
        out.append(f"- (c) not measurable with {cc['slots']} site slot(s).")
    return out


def write_markdown(analyses: list[Analysis], path: Path, *, header: str = "",
                   images: dict[str, list[str]] | None = None) -> Path:
    """Write the report: per model, claims with numbers, the site table, memory, plots.

    Args:
        analyses: one `Analysis` per model.
        path: the Markdown file to write.
        header: text put first (title, command, machine).
        images: model label -> PNG paths relative to ``path``'s folder.

    Returns:
        ``path``.
    """
    lines = [header.rstrip(), ""] if header else []
    for an in analyses:
        lines += [f"## {an.model}", "", *claims_lines(an), "", *site_table(an), ""]
        if an.memory:
            lines += ["Memory at the default config (`laser_fx.report` after one training"
                      " forward of `laser_fx.compress(model, example_inputs=inputs)`):", "",
                      "| site | mechanism | rank | stored | dense | saved |", "|---|---|---|---|---|---|"]
            for name, m in an.memory.items():
                lines.append(f"| `{name}` | {m['mechanism']} | {m['rank']} |"
                             f" {_fmt_bytes(m['stored_bytes'])} | {_fmt_bytes(m['dense_bytes'])} |"
                             f" {m['saved']:.0%} |" if m.get("saved") is not None else
                             f"| `{name}` | {m['mechanism']} | - | - | - | - |")
            lines.append("")
        lin = an.extra.get("memory_linear")
        if lin:
            saved = [m["saved"] for m in lin.values() if m.get("saved") is not None]
            if saved:
                lines += [f"With `mode=\"linear\"` (every op site compressed on its own):"
                          f" {len(saved)} op sites save {min(saved):.0%}-{max(saved):.0%}"
                          f" of their input bytes (median {statistics.median(saved):.0%}).", ""]
        for site, note in an.notes.items():
            lines.append(f"- note on `{site}`: {note}")
        for img in (images or {}).get(an.model, []):
            lines.append(f"![{Path(img).stem}]({img})")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
