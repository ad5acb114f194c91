"""Test helpers shipped with laser_fx: a zoo of small looped (and negative-case) models,
`own_code` / `entry` for comparing compiled variants of one model in one process, and
`deferred_refinements` (the trackers' accelerator path on any device)."""

from __future__ import annotations

from .deferral import deferred_refinements
from .isolation import entry, own_code
from .zoo import (
    NEGATIVE,
    TRACEABLE,
    WEIGHT_SHARED,
    ZOO,
    DataDependentLoop,
    GradModesModel,
    LoopedTransformer,
    PlainMLP,
    RecursiveConvRefiner,
    TRMLike,
    UnrolledRNN,
    make_inputs,
    swiglu_hidden,
)

__all__ = [
    "NEGATIVE",
    "TRACEABLE",
    "WEIGHT_SHARED",
    "ZOO",
    "DataDependentLoop",
    "GradModesModel",
    "LoopedTransformer",
    "PlainMLP",
    "RecursiveConvRefiner",
    "TRMLike",
    "UnrolledRNN",
    "deferred_refinements",
    "entry",
    "make_inputs",
    "own_code",
    "swiglu_hidden",
]
