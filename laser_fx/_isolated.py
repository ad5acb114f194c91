"""One helper for runs that must leave no trace: buffers, RNG streams, grad mode, train flags.

laser_fx runs the user's model (or a block of it) on its own account in three places: the
discovery probe, the check after the swap, and a compressed checkpoint's re-run in backward.
Each must leave the model as it found it, also when the run raises: BatchNorm statistics
and counters not advanced, the global RNG streams not consumed, grad mode and ``training``
flags as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["cuda_devices", "isolated", "restore_buffers"]


def cuda_devices(tensors: Iterable[object]) -> list[int]:
    """Indices of the CUDA devices the given tensors live on (for `torch.random.fork_rng`)."""
    return sorted({t.get_device() for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda})


@contextlib.contextmanager
def restore_buffers(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Put every buffer of ``modules`` back to its value on entry (in place) when leaving."""
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers(recurse=False)
             if isinstance(b, torch.Tensor)]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                if b.shape == value.shape:
                    b.copy_(value)


@contextlib.contextmanager
def isolated(
    model: nn.Module,
    *,
    devices: Iterable[int] = (),
    rng: bool = True,
    train_flags: bool = True,
) -> Iterator[None]:
    """Run a block of code on ``model`` without side effects on its state.

    Restores, also when the block raises: every buffer of ``model`` (values, in place), the
    CPU RNG stream and that of each CUDA device in ``devices`` (``rng=True``), the grad mode,
    and each submodule's ``training`` flag (``train_flags=True``).

    Args:
        model: the module whose buffers and flags are restored.
        devices: CUDA device indices whose RNG streams are restored.
        rng: restore the RNG streams.
        train_flags: restore ``training`` of every submodule.
    """
    modules = list(model.modules())
    flags = [(m, m.training) for m in modules] if train_flags else []
    with contextlib.ExitStack() as stack:
        if rng:
            stack.enter_context(torch.random.fork_rng(devices=list(devices)))
        stack.enter_context(torch.set_grad_enabled(torch.is_grad_enabled()))
        stack.enter_context(restore_buffers(modules))
        try:
            yield
        finally:
            for m, flag in flags:
                m.training = flag
