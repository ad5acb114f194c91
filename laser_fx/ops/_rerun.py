"""How ``laser_fx::rerun`` computes a traced call's gradients from its rebuilt inputs.

Two ways, the same gradients:

* **one compiled graph** (`_joint`): ``torch.func.vjp`` of the block (``functional_call``
  on detached parameters), compiled with the site's ``compile_backend`` as an inference
  graph, so the recompute and its backward fuse as in torch's own compiled checkpoint
  (`benchmarks/compiled.py`, TRM: 1.17x -> 1.15x and 1.09x -> 1.07x of compiled torch
  checkpoint's step at D=128 and 256, for ~5% more peak; results/compiled*.md). Used when
  the block's parameter gradients go to ``.grad`` and a backend is set, from a site's
  second re-run on;
  a block it cannot transform (BatchNorm updates its statistics in place, which ``vjp``
  refuses) falls back to:
* **re-run and autograd**: the block (`SiteWrapper.compiled_block`) with autograd
  re-enabled inside the op's kernel, then ``autograd.backward`` (parameters into ``.grad``)
  or ``autograd.grad`` (declared parameters, returned). It checks that the block reads no
  tensor requiring grad besides its inputs and parameters (`check_declared`): the traced
  forward would have dropped that tensor's gradient. A site's first re-run is always this
  one, so the check runs before the fused graph, which cannot make it, takes over.

The caller (`laser_fx.ops.traced.rerun`) restores buffers, RNG streams and autocast around
this, and checks that nothing drew random numbers.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ._dropout import replaying
from ._layout import layout_of, rebuild
from ._param_grads import tensor_hooks_suspended
from ._tensors import check_declared

__all__ = ["autograd_enabled", "gradients"]


@contextlib.contextmanager
def autograd_enabled() -> Iterator[None]:
    """Autograd inside a custom op's kernel, which runs below the autograd dispatch keys
    (the re-run must record a graph to backpropagate through)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView)
    for key in (torch._C.DispatchKey.AutogradCPU, torch._C.DispatchKey.AutogradCUDA):
        keys = keys | torch._C.DispatchKeySet(key)
    guard = torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                            torch._C._dispatch_tls_local_exclude_set() - keys)
    with guard, torch.enable_grad():
        yield


def gradients(wrapper: Any, lay: int, present: Sequence[bool], inputs: Sequence[Tensor],
              needs: Sequence[bool], grads: Sequence[Tensor], params: Sequence[Tensor],
              in_place: bool, seed: Tensor | None = None) -> list[Tensor | None]:
    """The gradients of the ``inputs`` marked in ``needs`` and of the declared ``params``
    (not ``in_place``) from the block's outputs' ``grads`` (``present``: which items of the
    call's output have one); ``in_place``: the block's parameter gradients are added to
    ``.grad`` instead; ``seed``: the forward's dropout seed (`laser_fx.ops._dropout`), if any."""
    joint = wrapper.__dict__.get("_joint")
    fast = in_place and wrapper.config.compile_backend is not None
    if fast and joint not in (None, False):
        try:
            return _joint_gradients(wrapper, joint, lay, present, inputs, needs, grads, seed)
        except Exception as err:  # noqa: BLE001 - any failure to transform: the plain way
            wrapper.__dict__["_joint"] = False
            warnings.warn(
                f"laser_fx: the re-run of {wrapper.site.name} cannot be one compiled vjp "
                f"graph ({type(err).__name__}: {str(err).splitlines()[0][:160]}); it re-runs "
                "the block and backpropagates instead (same gradients, a little slower).",
                stacklevel=2)
    with replaying(seed):
        got = _autograd_gradients(wrapper, lay, present, inputs, needs, grads, params,
                                  in_place)
    if fast and joint is None:  # checked once (`check_declared`): later re-runs may fuse
        wrapper.__dict__["_joint"] = torch.compile(_vjp, backend=wrapper.config.compile_backend)
    return got


def _autograd_gradients(wrapper: Any, lay: int, present: Sequence[bool],
                        inputs: Sequence[Tensor], needs: Sequence[bool],
                        grads: Sequence[Tensor], params: Sequence[Tensor],
                        in_place: bool) -> list[Tensor | None]:
    inputs = [x.requires_grad_(need) if x.is_floating_point() else x
              for x, need in zip(inputs, needs, strict=True)]
    wrt = [x for x, need in zip(inputs, needs, strict=True) if need] + list(params)
    with autograd_enabled():
        args, kwargs = rebuild(layout_of(lay), iter(inputs))
        out = wrapper.compiled_block()(*args, **kwargs)
        items = list(out) if isinstance(out, tuple) else [out]
        given = iter(grads)
        pairs = [(o, next(given)) for o, has in zip(items, present, strict=True) if has]
        pairs = [(o, g) for o, g in pairs if isinstance(o, Tensor) and o.requires_grad]
        if not pairs:
            return [None] * len(wrt)
        roots, root_grads = [o for o, _ in pairs], [g for _, g in pairs]
        block_params = [p for p in wrapper.wrapped.parameters() if p.requires_grad]
        check_declared(wrapper.site.name, roots, [*inputs, *block_params])
        if in_place:
            torch.autograd.backward(roots, root_grads, inputs=wrt + block_params)
            return [x.grad for x in wrt]
        if not wrt:
            return []
        with tensor_hooks_suspended(params):
            return list(torch.autograd.grad(roots, wrt, root_grads, allow_unused=True))


def _vjp(block: Any, lay: int, present: tuple, mask: tuple, params: dict, diff: list,
         rest: list, grads: list, seed: Tensor | None) -> tuple[dict, tuple]:
    """``vjp`` of the block at (``params``, the inputs ``mask`` marks) for ``grads``, its
    dropout masks drawn from ``seed``."""

    def run(p: dict, d: tuple) -> tuple:
        it_d, it_r = iter(d), iter(rest)
        flat = [next(it_d) if m else next(it_r) for m in mask]
        args, kwargs = rebuild(layout_of(lay), iter(flat))
        with replaying(seed):
            out = torch.func.functional_call(block, p, args, kwargs)
        items = list(out) if isinstance(out, tuple) else [out]
        return tuple(o for o, has in zip(items, present, strict=True) if has)

    _, pullback = torch.func.vjp(run, params, tuple(diff))
    return pullback(tuple(grads))


def _joint_gradients(wrapper: Any, joint: Any, lay: int, present: Sequence[bool],
                     inputs: Sequence[Tensor], needs: Sequence[bool],
                     grads: Sequence[Tensor], seed: Tensor | None) -> list[Tensor | None]:
    named = [(n, p) for n, p in wrapper.wrapped.named_parameters() if p.requires_grad]
    mask = tuple(bool(need) for need in needs)
    diff = [x.detach() for x, m in zip(inputs, mask, strict=True) if m]
    rest = [x for x, m in zip(inputs, mask, strict=True) if not m]
    with torch.no_grad():  # an inference graph: nothing of it is differentiated again
        by_name, by_input = joint(wrapper.wrapped, lay, tuple(present), mask,
                                  {n: p.detach() for n, p in named}, diff, rest, list(grads),
                                  seed)
    for n, p in named:  # as AccumulateGrad does: the first gradient is adopted, later added
        g = by_name[n]
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)
    return list(by_input)
