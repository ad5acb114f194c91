"""Autograd ops that store saved activations through a `SubspaceTracker`.

Three mechanisms, selectable per site (`LaserConfig.mode`):

* `compressed_linear`: exact forward and grad_input; grad_weight from stored coefficients.
* `compressed_checkpoint`: a block call keeps only its inputs, low-rank; recomputed in backward.
* `compressed_region` / `CompressedRegion`: activation-shaped tensors saved inside a block
  call are stored low-rank; attention internals and statistics stay exact.
"""

from __future__ import annotations

from .checkpoint import compressed_checkpoint, is_recomputing
from .linear import compressed_linear
from .region import CompressedRegion, compressed_region

__all__ = [
    "CompressedRegion",
    "compressed_checkpoint",
    "compressed_linear",
    "compressed_region",
    "is_recomputing",
]
