"""Test helpers shipped with laser_fx: a zoo of small looped (and negative-case) models."""

from __future__ import annotations

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
    "make_inputs",
    "swiglu_hidden",
]
