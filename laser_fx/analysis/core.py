"""`analyze`: capture a training forward's stored activations and measure their geometry."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._isolated import isolated
from ..config import LaserConfig
from ..errors import ConfigError
from ..probe import _as_tuple
from ..sites import SiteSelector
from .capture import Capture, capture_activations
from .report import Analysis, SiteAnalysis
from .spectra import (
    effective_rank,
    participation_ratio,
    principal_angles,
    rank_k_energy,
    singular_values,
    subspace_energy,
    top_basis,
)
from .tracking import replay_tracker, track_subspace

__all__ = ["DEFAULT_KS", "analyze", "analyze_capture", "memory_by_site"]

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 128)


def _step_stats(x: Tensor, prev: Tensor | None, ks: list[int]) -> dict[str, Any]:
    """Spectrum statistics of one use, and its drift from the previous use."""
    width = x.shape[1]
    s = singular_values(x)
    e90, e99 = effective_rank(s, 0.90), effective_rank(s, 0.99)
    pr = participation_ratio(s)
    out: dict[str, Any] = {
        "rows": int(x.shape[0]), "singular_values": [float(v) for v in s],
        "erank90": e90, "erank99": e99, "participation_ratio": pr,
        "erank90_frac": e90 / width, "erank99_frac": e99 / width,
        "participation_ratio_frac": pr / width, "rank_k_energy": rank_k_energy(s, ks),
        "drift_max_deg": None, "prev_basis_energy": None,
    }
    if prev is not None:
        drift: list[float | None] = []
        kept: list[float | None] = []
        # one SVD each, sliced per k (the top-k basis is a prefix of the full one)
        full_x, full_p = top_basis(x, width), top_basis(prev, width)
        rank = min(full_x.shape[1], full_p.shape[1])
        for k in ks:
            if k >= width or k > rank:  # the whole space (or past the rank): no angle to speak of
                drift.append(None)
                kept.append(None)
                continue
            angles = principal_angles(full_p[:, :k], full_x[:, :k])
            drift.append(math.degrees(float(angles[-1])))
            kept.append(subspace_energy(x, full_p[:, :k]))
        out["drift_max_deg"], out["prev_basis_energy"] = drift, kept
    return out


def analyze_capture(
    cap: Capture, ks: list[int], config: LaserConfig, iters: Sequence[int] = (1, 2)
) -> SiteAnalysis:
    """Statistics of one captured site slot (spectra per use, drift, tracking, tracker replay).

    Args:
        cap: the recorded matrices (see `capture_activations`).
        ks: ranks for rank-k energy and drift.
        config: the config the tracker replay runs at.
        iters: power-iteration counts to measure tracking with.

    Returns:
        The `SiteAnalysis`.
    """
    steps = [_step_stats(x, cap.matrices[i - 1] if i else None, ks)
             for i, x in enumerate(cap.matrices)]
    k = max(1, min(cap.width, steps[0]["erank99"])) if steps else 1
    tracking = {str(it): track_subspace(cap.matrices, k, it) for it in iters}
    return SiteAnalysis(
        key=cap.key, site=cap.site, kind=cap.kind, slot=cap.slot, width=cap.width,
        calls=cap.calls, uses=list(cap.uses), steps=steps, track_rank=k, tracking=tracking,
        tracker=replay_tracker(cap.matrices, cap.width, config),
    )


def memory_by_site(
    model: nn.Module,
    inputs: Sequence[Any] | Tensor,
    example_kwargs: dict[str, Any] | None = None,
    config: LaserConfig | None = None,
) -> dict[str, dict[str, Any]]:
    """Bytes each compressed site stores vs dense, after one training forward.

    Compresses ``model`` in place, runs one grad-enabled training forward, reads
    `laser_fx.report` and strips the model again (`laser_fx.strip`; RNG and buffers restored),
    so the caller's model is left uncompressed.

    Returns:
        site name -> ``mechanism``, ``rank``, ``stored_bytes``, ``dense_bytes``, ``saved``
        (1 - stored/dense, None when nothing was stored).
    """
    from ..api import compress, strip  # api imports the package; import when called
    from ..report import report

    args, kwargs = _as_tuple(inputs), dict(example_kwargs or {})
    cmodel = compress(model, config=config, example_inputs=args, example_kwargs=kwargs or None)
    try:
        with isolated(model), torch.enable_grad():
            cmodel.train()
            cmodel(*args, **kwargs)
        rows = report(cmodel).to_dict()["sites"]
    finally:
        strip(cmodel)  # compress works in place: give the caller's modules back
    out = {}
    for s in rows:
        dense = s["dense_bytes"]
        out[s["name"]] = {
            "mechanism": s["mechanism"], "rank": s["rank"], "stored_bytes": s["stored_bytes"],
            "dense_bytes": dense, "saved": 1.0 - s["stored_bytes"] / dense if dense else None,
        }
    return out


def analyze(
    model: nn.Module,
    inputs: Sequence[Any] | Tensor,
    sites: SiteSelector = "auto",
    example_kwargs: dict[str, Any] | None = None,
    config: LaserConfig | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    label: str | None = None,
    memory: bool = True,
    linear_memory: bool = False,
) -> Analysis:
    """Measure the geometry of the activations a looped model stores for backward.

    One training-mode forward with grad enabled is recorded (RNG, buffers and mode restored):
    for each site `laser_fx.find_sites` reports, every grad-enabled use's stored activation
    (a module site's tensor arguments, an op site's input) as a (tokens, width) matrix. Uses
    under ``torch.no_grad`` store nothing for backward and are not recorded. Per use: the
    singular value spectrum (float64), 90%/99%-energy ranks, participation ratio, rank-k
    energy, principal angles to the previous use's top-k subspace; per site slot: the error
    of 1 and 2 warm-started power iterations against the exact top-k at every step, and the
    resets a fresh `SubspaceTracker` at ``config`` needs on the same sequence.

    Args:
        model: the eager looped model (not a compressed one).
        inputs: positional example inputs, as for `laser_fx.compress`.
        sites: which sites (``"auto"``, names, a regex, or ``Site -> bool``).
        example_kwargs: keyword example inputs.
        config: `LaserConfig` for the tracker replay and the memory figures (default
            ``LaserConfig()``).
        ks: ranks at which rank-k energy and drift are reported.
        label: name of the model in the report (default: its class name).
        memory: also compress the model and record bytes saved per site.
        linear_memory: also compress with ``mode="linear"`` (every op site on its own) and
            keep those bytes in ``extra["memory_linear"]``.

    Returns:
        The `Analysis` (``to_dict()`` is JSON-able).

    Example::

        an = laser_fx.analyze(model, (tokens,))
        print(an.claims()["a"])
    """
    config = LaserConfig() if config is None else config
    if not isinstance(config, LaserConfig):
        raise ConfigError(f"`config` must be a LaserConfig, got {type(config).__name__}.")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"`ks` must be positive ranks, got {list(ks)}.")
    _, captures, notes = capture_activations(model, inputs, sites, example_kwargs)
    slots = [analyze_capture(c, ks, config) for c in captures if c.matrices]
    for c in captures:
        if not c.matrices:
            notes.setdefault(c.key, f"no grad-enabled use among {c.calls} calls")
    mem = memory_by_site(model, inputs, example_kwargs, config) if memory else {}
    extra: dict[str, Any] = {}
    if linear_memory:
        lin = dataclasses.replace(config, mode="linear")
        extra["memory_linear"] = memory_by_site(model, inputs, example_kwargs, lin)
    cfg = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
           if isinstance(getattr(config, f.name), (int, float, str, bool, type(None)))}
    return Analysis(model=label or type(model).__name__, ks=ks, sites=slots, memory=mem,
                    config=cfg, notes=notes, extra=extra)
