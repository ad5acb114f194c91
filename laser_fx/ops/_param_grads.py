"""Where a compressed checkpoint's parameter gradients go.

Parameter gradients, like ``torch.utils.checkpoint``'s reentrant variant: under a plain
``loss.backward()`` the re-run's backward accumulates them into each parameter's ``.grad``
itself, one parameter at a time, and the checkpoint hands autograd only the gradients of its
inputs, so no second full set of parameter gradients exists at once (for a block called n
times, autograd would otherwise hold the running sum of the calls' gradients next to the set
the current call computes). Where that would change what the caller sees, the gradients
take autograd's path instead (returned by the checkpoint, added to ``.grad`` once after all
calls): under ``torch.autograd.grad`` and ``backward(inputs=...)`` (they read or restrict
the gradients autograd routes; ``torch.autograd._is_checkpoint_valid()`` tells), when a
parameter has a tensor hook (``register_hook``, ``register_multi_grad_hook``) or a
post-accumulate-grad hook (accumulating per call would run it once per call, on a partial
gradient, and once more with None), when a parameter is not a leaf (its gradient must flow
on through autograd), and for calls made inside a ``DistributedDataParallel`` forward (its
reducer marks each parameter ready when its gradient is accumulated: once per backward).
On autograd's path a parameter's tensor hooks run once, on the gradient summed over every
use, as in the plain model: the re-run's ``autograd.grad`` runs with them suspended.
Hooks registered on a parameter's gradient accumulator node itself cannot be seen; under a
plain ``backward()`` they run once per block call (and once more with None).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

__all__ = ["accumulates_in_place", "inside_ddp_forward", "may_accumulate_in_place",
           "tensor_hooks_suspended"]


def inside_ddp_forward() -> bool:
    """Whether this call runs inside the forward of a ``DistributedDataParallel`` module."""
    ddp = getattr(getattr(torch.nn, "parallel", None), "DistributedDataParallel", None)
    return getattr(ddp, "_active_ddp_module", None) is not None


def accumulates_in_place(params: Sequence[torch.Tensor], under_ddp: bool) -> bool:
    """Whether this backward may accumulate ``params``' gradients into ``.grad`` itself.

    Only under a plain ``backward()`` (not ``autograd.grad``, not ``backward(inputs=...)``),
    outside DDP, and when every parameter is a leaf without tensor or post-accumulate hooks:
    then the result is the same as returning the gradients through autograd (see above).
    """
    return torch.autograd._is_checkpoint_valid() and may_accumulate_in_place(params, under_ddp)


def may_accumulate_in_place(params: Sequence[torch.Tensor], under_ddp: bool) -> bool:
    """The part of `accumulates_in_place` known before backward: outside DDP, and every
    parameter a leaf without tensor or post-accumulate hooks."""
    return not under_ddp and all(
        p.is_leaf
        and not getattr(p, "_backward_hooks", None)
        and not getattr(p, "_post_accumulate_grad_hooks", None)
        for p in params
    )


@contextlib.contextmanager
def tensor_hooks_suspended(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """The tensors' own gradient hooks (``register_hook``) do not run inside.

    ``autograd.grad`` runs a tensor's hooks when it captures its gradient, so the re-run's
    backward would run them on each call's partial gradient, and autograd runs them again on
    the sum it routes to the tensor: a hook that scales the gradient scaled it twice. The
    hooks live in ``_backward_hooks``, the dict autograd's hook object reads when it runs:
    emptied here, refilled (in order) on the way out.
    """
    saved: list[tuple[dict, list]] = []
    for t in {id(t): t for t in tensors}.values():
        hooks = getattr(t, "_backward_hooks", None)
        if hooks:
            saved.append((hooks, list(hooks.items())))
            hooks.clear()
    try:
        yield
    finally:
        for hooks, items in saved:
            added = list(hooks.items())  # registered meanwhile: after the earlier ones
            hooks.clear()
            hooks.update(items)
            hooks.update(added)
