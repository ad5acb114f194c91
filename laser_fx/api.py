"""The one-call API: `compress`, `report`, `strip`."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from .config import LaserConfig
from .errors import ConfigError
from .modules import BlockSite, LaserState, LinearSite
from .passes import PassResult, run_passes
from .passes.find_sites import find_sites_pass
from .passes.insert_compression import STATE_NAME, insert_compression
from .passes.plan import Plan, SiteSelector, plan_sites
from .passes.verify import verify
from .sites import _as_tuple, _propagate_shapes
from .tracing import trace

__all__ = ["Report", "compress", "is_compressed", "report", "strip"]

_ORIGINAL = "_laser_fx_uncompressed"


def is_compressed(module: nn.Module) -> bool:
    """Whether ``module`` was returned by `compress`."""
    return isinstance(getattr(module, STATE_NAME, None), LaserState)


def compress(
    model: nn.Module,
    sites: SiteSelector = "auto",
    *,
    config: LaserConfig | None = None,
    example_inputs: Sequence[Any] | torch.Tensor = (),
    example_kwargs: dict[str, Any] | None = None,
    exclude: SiteSelector | None = None,
) -> GraphModule:
    """Return ``model`` as a graph module whose weight-shared sites store activations low-rank.

    The result takes the same arguments and returns the same outputs; only what autograd keeps
    for backward at the chosen sites changes. Parameters (and buffers) are SHARED with
    ``model``, which is not modified: an optimizer built on either trains both. For an
    independent copy, compress ``copy.deepcopy(model)``.

    Args:
        model: the looped / recursive model.
        sites: ``"auto"`` (every site), a list of site names (see `find_sites`), a regex
            matched with ``re.fullmatch``, or a callable ``Site -> bool``.
        config: `LaserConfig` (default ``LaserConfig()``); ``per_site`` overrides per regex.
        example_inputs: positional example inputs. With them, the capture and the compressed
            forward are checked against ``model``; a model plain fx cannot trace (Hugging Face
            transformers) is captured by ``torch.export``.
        example_kwargs: keyword example inputs.
        exclude: sites to leave alone, in the same forms as ``sites``.

    Returns:
        The compressed ``GraphModule``; its LASER state (trackers, as buffers) is
        ``cmodel.laser_fx``.

    Raises:
        NoSitesError: no weight-shared site, or every selected site was left alone.
        ConfigError: invalid config or selector; ``model`` already compressed.
        TraceError: the model could not be captured faithfully.

    Example::

        cmodel = laser_fx.compress(model, sites="auto", example_inputs=(x,))
        loss_fn(cmodel(x), y).backward()
        print(laser_fx.report(cmodel))
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compress expects an nn.Module, got {type(model).__name__}.")
    if is_compressed(model):
        raise ConfigError(
            "This model is already compressed by laser_fx. Compress the original model, or "
            "call laser_fx.strip(cmodel) first to get the uncompressed one."
        )
    config = LaserConfig() if config is None else config
    if not isinstance(config, LaserConfig):
        raise ConfigError(f"`config` must be a LaserConfig, got {type(config).__name__}.")
    if isinstance(example_inputs, Mapping):
        raise ConfigError(
            "`example_inputs` are the positional inputs (a tuple); pass keyword inputs as "
            f"`example_kwargs`, e.g. example_kwargs={{{', '.join(map(repr, example_inputs))}: ...}}."
        )
    args, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    if args or kwargs:
        try:
            inspect.signature(model.forward).bind(*args, **kwargs)
        except TypeError as e:
            raise ConfigError(
                f"example_inputs/example_kwargs do not match {type(model).__name__}.forward"
                f"{inspect.signature(model.forward)}: {e}. Pass example_inputs (and "
                "example_kwargs) exactly as the model is called."
            ) from e
    gm = trace(model, args, kwargs or None)
    if args or kwargs:
        _propagate_shapes(gm, args, kwargs)
    # Kept for `strip`: the same graph before the rewrite, sharing every parameter.
    uncompressed = GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    found: dict[str, Any] = {}

    def find_sites(g: GraphModule) -> PassResult:
        res = find_sites_pass(g)
        found["sites"] = res.record
        return res

    def plan(g: GraphModule) -> PassResult:
        res = plan_sites(g, found["sites"], sites, exclude, config)
        found["plan"] = res.record
        return res

    def insert(g: GraphModule) -> PassResult:
        return insert_compression(g, found["plan"])

    def check(g: GraphModule) -> PassResult:
        return verify(g, uncompressed, args, kwargs)

    gm, _ = run_passes(gm, [find_sites, plan, insert, check])
    # Kept on the state module (an ordinary nn.Module), not on the GraphModule, whose
    # deepcopy keeps only a fixed set of attributes. Unregistered: it shares every tensor.
    object.__setattr__(gm.laser_fx, _ORIGINAL, uncompressed)
    gm.laser_fx.skipped = dict(found["plan"].skipped)
    return gm


def strip(cmodel: nn.Module) -> GraphModule:
    """The uncompressed model behind ``cmodel``; it shares every parameter with ``cmodel``."""
    if not is_compressed(cmodel):
        raise ConfigError(
            f"strip expects a module returned by laser_fx.compress, got {type(cmodel).__name__}."
        )
    original = getattr(cmodel, STATE_NAME).__dict__.get(_ORIGINAL)
    if original is None:
        raise ConfigError(
            "This compressed module has lost its uncompressed graph (it was rebuilt outside "
            "laser_fx); compress the original model again instead."
        )
    return original


@dataclass
class Report:
    """Per-site state of a compressed model; ``str()`` is a table, `to_dict` is JSON-able."""

    sites: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

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
                "skipped": dict(self.skipped)}

    def __str__(self) -> str:
        head = ("site", "mechanism", "uses", "grad", "width", "rank", "fidelity", "resets",
                "stored", "dense")
        rows = [head]
        for s in self.sites:
            fid = "-" if s["fidelity"] is None else f"{s['fidelity']:.4f}"
            rows.append((s["name"], s["mechanism"], str(s["uses"]), str(s["grad_uses"]),
                         "/".join(map(str, s.get("widths") or [s["width"]])), str(s["rank"]), fid, str(s["resets"]),
                         _fmt_bytes(s["stored_bytes"]), _fmt_bytes(s["dense_bytes"])))
        t = self.totals()
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}x"
        rows.append(("total", "", "", "", "", "", "", str(t["resets"]),
                     _fmt_bytes(t["stored_bytes"]), _fmt_bytes(t["dense_bytes"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"stored/dense (last training step): {ratio}; "
                     f"non-finite calls: {t['nonfinite']}")
        for name, why in self.skipped.items():
            lines.append(f"left alone: {name}: {why}")
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _site_row(module: LinearSite | BlockSite) -> dict[str, Any]:
    site = module.site
    trackers = module.tracker_list()
    stats = [t.stats() for t in trackers]
    if isinstance(module, BlockSite):
        st = module.last_stats
        stored, dense = st.total_stored_bytes, st.seen_bytes
    else:  # coefficients of this step, plus the basis they refer to
        (trk,), (st,) = trackers, stats
        compressed = st["stored_bytes"] < st["dense_bytes"]
        stored = st["stored_bytes"] + (trk.basis.numel() * trk.basis.element_size() if compressed else 0)
        dense = st["dense_bytes"]
    return {
        "name": site.name,
        "mechanism": module.mechanism,
        "uses": site.num_uses,
        "grad_uses": site.grad_uses,
        "width": site.width,
        "widths": list(site.widths) or [site.width],
        "rank": max((s["rank"] for s in stats), default=0),
        "ranks": [s["rank"] for s in stats],
        "fidelity": min((s["last_fidelity"] for s in stats), default=None),
        "min_fidelity": min((s["min_fidelity"] for s in stats), default=None),
        "resets": sum(s["resets"] for s in stats),
        "calls": sum(s["calls"] for s in stats),
        "nonfinite": sum(s["nonfinite"] for s in stats),
        "stored_bytes": int(stored),
        "dense_bytes": int(dense),
    }


def report(cmodel: nn.Module) -> Report:
    """Per-site ranks, fidelity, resets and stored vs dense bytes of the last training step.

    Example::

        r = laser_fx.report(cmodel)
        print(r)                      # a table
        r.to_dict()["sites"][0]       # {"name": ..., "rank": ..., "stored_bytes": ...}
    """
    if not is_compressed(cmodel):
        raise ConfigError(
            f"report expects a module returned by laser_fx.compress, got {type(cmodel).__name__}."
        )
    state: LaserState = getattr(cmodel, STATE_NAME)
    rows = [_site_row(m) for m in state.sites.values()]
    return Report(rows, dict(getattr(state, "skipped", {})))
