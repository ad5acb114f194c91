"""Mechanism ``"checkpoint"``: a call keeps only its inputs, low-rank, and is re-run in backward."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from ..ops.checkpoint import compressed_checkpoint
from ..ops.traced import traceable, traced_checkpoint
from .base import Mechanism

__all__ = ["Checkpoint"]


class Checkpoint(Mechanism):
    """`compressed_checkpoint` around every grad-enabled call of the module.

    Each floating tensor input of at least ``min_numel`` elements is packed by the tracker
    of its position among the call's tensor inputs (slot ``in<i>``), so input i of one
    recursion step is tracked from input i of the previous one. Channels-first inputs of
    convolutions are compressed along the channel axis.
    """

    name = "checkpoint"

    def call(self, wrapper: Any, args: tuple, kwargs: dict, compiled: bool = False) -> Any:
        module = wrapper.wrapped
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        dims = [wrapper.input_dim(t) for t in tensors]
        params = [p for p in module.parameters() if p.requires_grad]
        fn = wrapper.compiled_block() if compiled else module
        return compressed_checkpoint(
            fn, lambda i, t: wrapper.input_tracker(i, t, dims[i]), *args, params=params,
            stats=wrapper.stats, feature_dims=dims, name=wrapper.site.name, **kwargs)

    def traceable(self, wrapper: Any, args: tuple, kwargs: dict) -> bool:
        return traceable(wrapper, args, kwargs)

    def traced(self, wrapper: Any, args: tuple, kwargs: dict) -> Any:
        return traced_checkpoint(wrapper, args, kwargs)
