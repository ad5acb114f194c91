"""`report`: what each compressed site of a model keeps for backward, measured."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import ConfigError
from .param_site import ParamSite, param_sites_of
from .wrapper import SiteWrapper

__all__ = ["Report", "compressed_sites", "report"]

#: attributes of a compressed model: sites left alone and why, and the granularity chosen
#: for each checkpointed block (written by `compress`, shown by `report`)
_SKIPPED = "_laser_fx_skipped"
_GRANULARITY = "_laser_fx_granularity"


def compressed_sites(model: nn.Module) -> list[SiteWrapper | ParamSite]:
    """Every compressed site below ``model``: swapped-in wrappers, then parameter sites."""
    return ([m for m in model.modules() if isinstance(m, SiteWrapper)]
            + [ps for _, ps in param_sites_of(model)])


@dataclass
class Report:
    """Per-site state of a compressed model; ``str()`` is a table, `to_dict` is JSON-able.

    ``stored_bytes`` is what the site's compressed calls of the last training step kept for
    backward; ``dense_bytes`` what the same calls would have kept uncompressed. Both are
    measured as the calls run (saved-tensor hooks), not estimated.
    """

    sites: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    granularity: dict[str, dict[str, Any]] = field(default_factory=dict)

    def totals(self) -> dict[str, Any]:
        stored = sum(s["stored_bytes"] for s in self.sites)
        dense = sum(s["dense_bytes"] for s in self.sites)
        return {
            "stored_bytes": stored,
            "dense_bytes": dense,
            "ratio": stored / dense if dense else None,
            "resets": sum(s["resets"] for s in self.sites),
            "nonfinite": sum(s["nonfinite"] for s in self.sites),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"sites": [dict(s) for s in self.sites], "totals": self.totals(),
                "skipped": dict(self.skipped), "granularity": dict(self.granularity)}

    def __str__(self) -> str:
        head = ("site", "mechanism", "calls", "grad", "width", "rank", "fidelity", "resets",
                "kept", "uncompressed", "ratio")
        rows = [head]
        for s in self.sites:
            fid = "-" if s["fidelity"] is None else f"{s['fidelity']:.4f}"
            ratio = f"{s['stored_bytes'] / s['dense_bytes']:.3f}x" if s["dense_bytes"] else "-"
            rows.append((s["name"], s["mechanism"], str(s["uses"]), str(s["grad_uses"]),
                         "/".join(map(str, s["widths"])), str(s["rank"]), fid, str(s["resets"]),
                         _fmt_bytes(s["stored_bytes"]), _fmt_bytes(s["dense_bytes"]), ratio))
        t = self.totals()
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}x"
        rows.append(("total", "", "", "", "", "", "", str(t["resets"]),
                     _fmt_bytes(t["stored_bytes"]), _fmt_bytes(t["dense_bytes"]), ratio))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"kept for backward by the compressed calls of the last training step: "
            f"{_fmt_bytes(t['stored_bytes'])} of {_fmt_bytes(t['dense_bytes'])} uncompressed "
            f"({ratio}); non-finite calls: {t['nonfinite']}"
        )
        for name, g in self.granularity.items():
            est = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in g["estimated_peak_bytes"].items())
            lines.append(f"{name}: checkpointed per {g['chosen']} (granularity {g['asked']!r}; "
                         f"estimated peak with inputs stored dense: {est})")
        for s in self.sites:
            if s.get("calibrated_cosine") is not None:
                lines.append(f"{s['name']}: calibrated energies {s['energies']} (gradient cosine "
                             f"{s['calibrated_cosine']:.5f} alone on the micro-batch)")
        for name, why in self.skipped.items():
            lines.append(f"left alone: {name}: {why}")
        return "\n".join(lines)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def report(model: nn.Module) -> Report:
    """Per-site mechanism, ranks, fidelity, resets, and bytes kept vs uncompressed.

    Example::

        r = laser_fx.report(model)
        print(r)                      # a table
        r.to_dict()["sites"][0]       # {"name": "net", "rank": ..., "stored_bytes": ...}
    """
    wrappers = compressed_sites(model) if isinstance(model, nn.Module) else []
    if not wrappers:
        raise ConfigError(
            f"report expects a model compressed by laser_fx.compress, got "
            f"{type(model).__name__} without compressed sites."
        )
    rows = [w.mechanism.row(w) for w in wrappers]
    return Report(rows, dict(model.__dict__.get(_SKIPPED, {})),
                  dict(model.__dict__.get(_GRANULARITY, {})))
