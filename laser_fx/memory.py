"""`measure_activation_memory`: bytes kept alive for backward, tracked by allocation.

A `TorchDispatchMode` sees every op's outputs; each storage an op creates is recorded with its
size and dropped from the live total when it is freed (`weakref.finalize` on the untyped storage,
which PyTorch keeps as one Python object for as long as the storage lives). What is still alive
right after the forward, with only the loss held, is what autograd (or a compression mechanism)
keeps for backward; the maximum of the live total over forward and backward is the peak.

Pack hooks are not used for this on purpose: hooks stack and only the innermost sees a tensor,
so they would miss what a compression mechanism stores.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import ConfigError

__all__ = ["ActivationMemory", "measure_activation_memory"]


@dataclass(frozen=True)
class ActivationMemory:
    """Bytes measured by `measure_activation_memory`.

    Attributes:
        after_forward: bytes created during the forward (and loss) still alive after it, with
            only the loss held (its own scalar not counted): the activation memory kept for
            backward.
        peak: the maximum of bytes alive (created since the forward began) over forward and
            backward, parameter gradients included.
        loss: the loss value of the measured step.
    """

    after_forward: int
    peak: int
    loss: float

    def ratio_to(self, other: ActivationMemory) -> float:
        """``self.after_forward / other.after_forward``."""
        return self.after_forward / max(other.after_forward, 1)


class _StorageTracker(TorchDispatchMode):
    """Records each storage an op creates; keeps a live total and its maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def tracks(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s storage was created while this mode was active and is alive."""
        return id(t.untyped_storage()) in self._seen

    def _drop(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views (of parameters, inputs, ...) share their base's storage: not a new allocation.
        inputs = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._seen or key in inputs:
                continue
            nbytes = storage.nbytes()
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._drop, key, nbytes)
        return out


def _default_loss(out: Any) -> torch.Tensor:
    floats = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        raise ConfigError(
            f"The model returned no floating-point tensor to build a loss from (got "
            f"{type(out).__name__}); pass `loss_fn=lambda output: ...` returning a scalar."
        )
    # Outputs that reach the parameters make the loss; a model run entirely without grad
    # still gets a (grad-free) scalar so that its forward can be measured.
    tracked = [t for t in floats if t.requires_grad] or floats
    loss = tracked[0].float().sum()
    for t in tracked[1:]:
        loss = loss + t.float().sum()
    return loss


def _check_loss(loss: object, custom: bool) -> torch.Tensor:
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss
    got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else (
        f"a {type(loss).__name__}"
    )
    who = "`loss_fn`" if custom else "The default loss"
    raise ConfigError(f"{who} must return a scalar tensor (one element), got {got}.")


def _own_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s storage when ``t`` is all of it (a fresh scalar loss), else 0."""
    storage = t.untyped_storage()
    return storage.nbytes() if storage.nbytes() == t.numel() * t.element_size() else 0


def measure_activation_memory(
    model: nn.Module | Callable[..., Any],
    inputs: Sequence[Any] | torch.Tensor = (),
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    backward: bool = True,
    kwargs: dict[str, Any] | None = None,
) -> ActivationMemory:
    """Measure the bytes a training step keeps alive for backward, and its peak.

    Every storage an op creates while the step runs is tracked until it is freed, so what
    autograd saves, and what a compression mechanism stores instead (tensors created inside
    saved-tensor pack hooks included), is counted; parameters, inputs and views of them are
    not. The loss scalar itself is not part of ``after_forward``.

    Args:
        model: any callable module (compressed or not).
        inputs: positional inputs (a tensor or a tuple of them).
        loss_fn: maps the model's output to a scalar loss (default: sum of the float outputs
            that require grad, or of all float outputs when none does).
        backward: also run backward (needed for the peak; parameter ``.grad`` is written,
            accumulated into existing gradients).
        kwargs: keyword inputs of the model (``input_ids=..., attention_mask=...``).

    Returns:
        `ActivationMemory` with ``after_forward`` (activation bytes) and ``peak``.

    Raises:
        ConfigError: ``model`` or ``loss_fn`` is not callable, ``loss_fn`` raised, or the
            loss is not a scalar tensor.

    Example::

        base = measure_activation_memory(model, (x,))
        laser_fx.compress(model, example_inputs=(x,))           # in place
        comp = measure_activation_memory(model, (x,))
        print(comp.ratio_to(base))
    """
    if not callable(model):
        raise ConfigError(f"`model` must be callable, got {type(model).__name__}.")
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(
            f"`loss_fn` must be callable (output -> scalar tensor), got {type(loss_fn).__name__}."
        )
    if isinstance(inputs, torch.Tensor):
        args: tuple = (inputs,)
    elif isinstance(inputs, (tuple, list)):
        args = tuple(inputs)
    else:
        raise ConfigError(
            f"`inputs` must be a tensor or a tuple of positional inputs, got "
            f"{type(inputs).__name__}."
        )
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConfigError(f"`kwargs` must be a dict of keyword inputs, got {type(kwargs).__name__}.")
    kwargs = dict(kwargs or {})
    tracker = _StorageTracker()
    with tracker:
        out = model(*args, **kwargs)
        if loss_fn is None:
            loss = _check_loss(_default_loss(out), custom=False)
        else:
            try:
                loss = loss_fn(out)
            except Exception as e:
                raise ConfigError(
                    f"`loss_fn` raised {type(e).__name__} on the model's output "
                    f"({type(out).__name__}): {e}"
                ) from e
            loss = _check_loss(loss, custom=True)
        # Drop the output so that only what backward needs stays alive.
        del out
        after_forward = tracker.live - (_own_bytes(loss) if tracker.tracks(loss) else 0)
        if backward and loss.requires_grad:
            loss.backward()
    value = float(loss.detach())
    return ActivationMemory(after_forward=after_forward, peak=tracker.peak, loss=value)
