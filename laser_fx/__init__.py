"""laser_fx: store the activations looped networks keep for backward in a tracked low-rank basis.

Example::

    import laser_fx
    laser_fx.compress(model, sites="auto", example_inputs=(x,))   # in place
    loss_fn(model(x), y).backward()
    print(laser_fx.report(model))
"""

from __future__ import annotations

from .analysis import Analysis, analyze
from .api import VerifyError, compress, is_compressed, strip
from .calibration import Calibration, calibrate
from .config import LaserConfig
from .errors import ConfigError, LaserFxError, NoSitesError, TraceError
from .memory import ActivationMemory, measure_activation_memory
from .packed import Packed, StorageStats
from .probe import find_sites
from .report import Report, report
from .sites import Site, Use
from .tracing import annotate, trace
from .tracker import SubspaceTracker
from .wrapper import SiteWrapper

__all__ = [
    "ActivationMemory",
    "Analysis",
    "Calibration",
    "ConfigError",
    "LaserConfig",
    "LaserFxError",
    "NoSitesError",
    "Packed",
    "Report",
    "Site",
    "SiteWrapper",
    "StorageStats",
    "SubspaceTracker",
    "TraceError",
    "Use",
    "VerifyError",
    "analyze",
    "annotate",
    "calibrate",
    "compress",
    "find_sites",
    "is_compressed",
    "measure_activation_memory",
    "report",
    "strip",
    "trace",
]

__version__ = "0.1.0"
