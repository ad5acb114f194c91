"""Activation-manifold analysis: how low-rank and how trackable a looped model's stored activations are.

Example::

    from laser_fx.analysis import analyze
    an = analyze(model, (tokens,))
    print(an.claims())
"""

from __future__ import annotations

from .capture import Capture, capture_activations
from .core import DEFAULT_KS, analyze, analyze_capture, memory_by_site
from .plots import plot_analysis
from .report import Analysis, SiteAnalysis, write_markdown
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

__all__ = [
    "DEFAULT_KS",
    "Analysis",
    "Capture",
    "SiteAnalysis",
    "analyze",
    "analyze_capture",
    "capture_activations",
    "effective_rank",
    "memory_by_site",
    "participation_ratio",
    "plot_analysis",
    "principal_angles",
    "rank_k_energy",
    "replay_tracker",
    "singular_values",
    "subspace_energy",
    "top_basis",
    "track_subspace",
    "write_markdown",
]
