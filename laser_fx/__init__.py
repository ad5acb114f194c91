"""laser_fx: store the activations looped networks keep for backward in a tracked low-rank basis.

Example::

    import laser_fx
    cmodel = laser_fx.compress(model, sites="auto", example_inputs=(x,))
    loss_fn(cmodel(x), y).backward()
    print(laser_fx.report(cmodel))
"""

from __future__ import annotations

from .analysis import Analysis, analyze
from .api import Report, compress, is_compressed, report, strip
from .config import LaserConfig
from .errors import ConfigError, LaserFxError, NoSitesError, TraceError
from .memory import ActivationMemory, measure_activation_memory
from .sites import Site, Use, find_sites
from .tracing import annotate, trace
from .tracker import Packed, SubspaceTracker

__all__ = [
    "ActivationMemory",
    "Analysis",
    "ConfigError",
    "LaserConfig",
    "LaserFxError",
    "NoSitesError",
    "Packed",
    "Report",
    "Site",
    "SubspaceTracker",
    "TraceError",
    "Use",
    "analyze",
    "annotate",
    "compress",
    "find_sites",
    "is_compressed",
    "measure_activation_memory",
    "report",
    "strip",
    "trace",
]

__version__ = "0.1.0"
