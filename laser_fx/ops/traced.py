"""The compressed checkpoint inside a compiled graph: two ``torch.library`` custom ops.

Under ``torch.compile`` a grad-enabled call of a checkpointed block whose arguments are
tensors and constants (`laser_fx.ops._layout`) is traced as `_TracedCheckpoint`, an
autograd.Function dynamo traces whole:

* forward: the block itself, traced into the caller's graph (no graph break: the recursion
  and its blocks compile as one graph, the block running as an inference graph that saves
  nothing), then ``laser_fx::pack``, which stores the inputs with the site's trackers and
  returns a token (a 0-d CPU int64 tensor);
* backward: ``laser_fx::rerun``, which rebuilds the inputs from the token's record and
  computes the gradients from them (`laser_fx.ops._rerun`: one compiled ``vjp`` graph of
  the block, or a re-run of it and autograd).

The trackers' data-dependent Python (ranks, decisions) runs inside the two ops, opaque to
the compiler; their fake implementations give the compiler shapes only. A record lives as
long as its token: autograd holds the token for backward, so a graph that is freed (or
never backpropagated) frees its records.

What differs from the eager checkpoint (`laser_fx.ops.checkpoint`), and why:

* once ``pack`` returns, the compiled graph may reuse the activation's buffer, so nothing
  may keep a reference to it (``SubspaceTracker.compress(borrowed=True)``): a record stored
  dense is a copy, and the decision about the call's basis is taken inside ``pack`` on a
  CPU, one call late from a copy on an accelerator;
* a call's role (its call site, `laser_fx.wrapper.call_site`) is read from dynamo's
  translators while tracing, as the Python stack inside a compiled graph shows no user
  lines: the same roles as eager calls from the same lines;
* the block's parameters are not inputs of the traced call: the re-run's backward adds
  their gradients to ``.grad`` itself, one call at a time, as torch's reentrant checkpoint
  does (returned gradients would be summed by the compiled backward, which keeps every
  call's set alive until the sum: a peak of calls x parameters). ``torch.autograd.grad``
  and ``backward(inputs=...)`` then raise. Inside a ``DistributedDataParallel`` forward, or
  when a parameter is not a leaf or has gradient hooks, the parameters are declared inputs
  and their gradients returned, as in eager mode (`laser_fx.ops._param_grads`);
* the compiled forward draws random numbers from the graph's own stream, which a re-run
  cannot replay: ``F.dropout`` in the block draws its masks from a per-call seed the record
  keeps (`laser_fx.ops._dropout`); blocks with channel or alpha dropout modules take the
  opaque path (`traceable`), and a re-run that draws random numbers anyway raises instead
  of giving gradients for other random draws;
* a call whose inputs need no gradient is a plain call (nothing for the Function to carry;
  its parameters' gradients come from the graph), and a tensor given twice is one input of
  the Function (dynamo cannot trace a Function given one tensor twice).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch._library.effects import EffectType

from .._isolated import cuda_devices, restore_buffers
from ..errors import LaserFxError
from ._compiled import new_token, record_of, site, traced_role
from ._dropout import SeededDropout, replayable
from ._layout import DTYPES, layout, layout_id, rebuild, tensors
from ._param_grads import inside_ddp_forward, may_accumulate_in_place
from ._rerun import gradients
from ._versions import check_versions, parameter_entries, versions_of
from .checkpoint import _AUTOCAST_DEVICES, _recomputing

__all__ = ["traceable", "traced_checkpoint"]


def traceable(wrapper: Any, args: tuple, kwargs: dict) -> bool:
    """Whether this grad-enabled call can be traced as `_TracedCheckpoint` (else it is one
    opaque call): arguments of tensors and constants in tuples, lists and dicts
    (`laser_fx.ops._layout`), and no active dropout module but ``nn.Dropout``
    (`laser_fx.ops._dropout.replayable`)."""
    return layout((args, kwargs)) is not None and replayable(wrapper.wrapped)


def traced_checkpoint(wrapper: Any, args: tuple, kwargs: dict) -> Any:
    """The grad-enabled call ``wrapper.wrapped(*args, **kwargs)`` as `_TracedCheckpoint`
    (traced by dynamo: call it only while compiling, after `traceable`)."""
    key = wrapper.op_key
    in_place = _in_place(key)
    flat = tensors((args, kwargs))
    if in_place and not any(t.requires_grad for t in flat):
        # no input needs a gradient: the parameters' come from a plain call (dynamo would
        # inline the Function's forward, and drops its ctx when the argument count happens
        # to equal forward's parameter count)
        return wrapper.wrapped(*args, **kwargs)
    declared = () if in_place else [p for p in wrapper.wrapped.parameters() if p.requires_grad]
    # the autocast state as dynamo traces the call: the compiled graph runs with autocast
    # folded into its ops, so `pack` would see none, and the re-run must replay it
    autocast = [i for i, d in enumerate(_AUTOCAST_DEVICES) if torch.is_autocast_enabled(d)
                for i in (i, DTYPES.index(torch.get_autocast_dtype(d)))]
    lay = layout((args, kwargs))
    # one Function input per distinct tensor (dynamo cannot trace a Function given one
    # tensor twice: ``net(h, h)``, a graph break); ``order``: each slot's input
    unique: list[Tensor] = []
    order = []
    for t in flat:  # plain loops: older dynamo releases cannot trace next() of a generator
        j = len(unique)
        for i, u in enumerate(unique):
            if u is t:
                j = i
                break
        if j == len(unique):
            unique.append(t)
        order.append(j)
    # the layout itself for the forward (reading it back from `_layout`'s list by id would
    # make dynamo guard on that list), its id for rerun
    return _TracedCheckpoint.apply(key, traced_role(key), layout_id(lay), lay, tuple(order),
                                   in_place, autocast, *unique, *declared)


@torch._dynamo.assume_constant_result
def _in_place(key: int) -> bool:
    """Whether the traced call's re-run may add its parameter gradients to ``.grad`` itself
    (`may_accumulate_in_place`); read when dynamo traces the call (hooks registered on a
    parameter after compiling are not seen: register them before)."""
    params = [p for p in site(key).wrapped.parameters() if p.requires_grad]
    return may_accumulate_in_place(params, inside_ddp_forward())


class _TracedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, key: int, role: int, lay: int, structure: Any, order: tuple,
                in_place: bool, autocast: list[int], *flat: Tensor) -> Any:
        n = len(set(order))
        xs = [flat[j] for j in order]
        args, kwargs = rebuild(structure, iter(xs))
        dropout = SeededDropout(key)  # masks the re-run can draw again
        with dropout:
            out = site(key).wrapped(*args, **kwargs)
        ctx.save_for_backward(pack(key, role, xs, autocast, dropout.seed), *flat[n:])
        ctx.key, ctx.in_place, ctx.lay, ctx.order = key, in_place, lay, order
        ctx.metas = [m for x in xs for m in (DTYPES.index(x.dtype), x.ndim, *x.shape)]
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        token, *params = ctx.saved_tensors
        order, n = ctx.order, len(set(ctx.order))
        unique_needs = ctx.needs_input_grad[7:7 + n]
        needs = [unique_needs[j] for j in order] + list(ctx.needs_input_grad[7 + n:])
        present = [g is not None for g in grads]  # an output that is no tensor has none
        got = iter(rerun(ctx.key, token, [g for g in grads if g is not None], params,
                         ctx.metas, needs, ctx.in_place, ctx.lay, present))
        summed: list[Tensor | None] = [None] * n  # a tensor in two slots: both gradients
        for j, need in zip(order, needs[:len(order)], strict=True):
            if need:
                g = next(got)
                summed[j] = g if summed[j] is None else summed[j] + g
        return ((None,) * 7 + tuple(summed)
                + tuple(next(got) if need else None for need in needs[len(order):]))


class _Record:
    """One call's stored inputs (a tracker's record, or an exact copy) and what its backward
    checks: the parameters' versions and the autocast state of the forward."""

    __slots__ = ("autocast", "inputs", "seed", "versions")

    def __init__(self, wrapper: Any, role: int, tensors: Sequence[Tensor],
                 autocast: Sequence[int], seed: Tensor | None) -> None:
        self.seed = seed
        self.autocast = [(_AUTOCAST_DEVICES[autocast[i]], DTYPES[autocast[i + 1]])
                         for i in range(0, len(autocast), 2)]
        self.versions = versions_of(parameter_entries(
            [p for p in wrapper.wrapped.parameters() if p.requires_grad]))
        stats = wrapper.stats
        wrapper.role = role
        self.inputs: list[Any] = []
        for i, t in enumerate(tensors):
            t = t.detach()
            dim = wrapper.input_dim(t)
            tracker = wrapper.input_tracker(i, t, dim)
            if tracker is None:
                copy = t.clone()  # the compiled graph may reuse t's buffer once we return
                stats.add_passthrough(copy)
                self.inputs.append(copy)
                continue
            moved = t if dim == -1 else t.movedim(dim, -1)
            packed = tracker.compress(moved, borrowed=True)
            stats.add_packed(moved, packed)
            self.inputs.append((tracker, dim, packed))

    def rebuild(self) -> list[Tensor]:
        """The inputs again: reconstructions of the tracked ones, fresh leaves."""
        out = []
        for entry in self.inputs:
            if isinstance(entry, Tensor):
                x = entry
            else:
                tracker, dim, packed = entry
                x = tracker.decompress(packed)
                x = x if dim == -1 else x.movedim(-1, dim)
            out.append(x.detach())
        return out


@torch.library.custom_op("laser_fx::pack", mutates_args=())
def pack(key: int, role: int, tensors: list[Tensor], autocast: list[int],
         seed: Tensor | None) -> Tensor:
    """Store one call's inputs with the trackers of its site and role (`traced_role`) and
    the call's autocast state (device index, dtype code pairs) and dropout seed
    (`laser_fx.ops._dropout`); returns the record's token."""
    wrapper = site(key)
    record = _Record(wrapper, role, tensors, autocast, None if seed is None else seed.clone())
    wrapper.stats.uncompressed_bytes += _estimated_saved_bytes(wrapper, tensors)
    wrapper.stats.calls += 1
    return new_token(record)


# ordered: never recomputed in backward from saved inputs, nor moved (`traced_linear`)
pack.register_effect(EffectType.ORDERED)


@pack.register_fake
def _(key: int, role: int, tensors: list[Tensor], autocast: list[int],
      seed: Tensor | None) -> Tensor:
    return torch.empty((), dtype=torch.int64)


def _estimated_saved_bytes(wrapper: Any, tensors: Sequence[Tensor]) -> int:
    """What the plain call would have saved for backward: the probe run's bytes saved per
    byte of input, times this call's input bytes (the traced forward saves nothing to
    measure with)."""
    uses = [u for u in wrapper.site.uses if u.grad_enabled and u.nbytes and u.input_bytes]
    size = sum(t.numel() * t.element_size() for t in tensors)
    if not uses:
        return size
    return int(size * sum(u.nbytes for u in uses) / sum(u.input_bytes for u in uses))


def _metas(metas: Sequence[int]) -> list[tuple[torch.dtype, list[int]]]:
    out, i = [], 0
    while i < len(metas):
        ndim = metas[i + 1]
        out.append((DTYPES[metas[i]], list(metas[i + 2: i + 2 + ndim])))
        i += 2 + ndim
    return out


def _rng_states(devices: Sequence[int]) -> list[Tensor]:
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices)]


@torch.library.custom_op("laser_fx::rerun", mutates_args=())
def rerun(key: int, token: Tensor, grads: list[Tensor], params: list[Tensor], metas: list[int],
          needs: list[bool], in_place: bool, lay: int, present: list[bool]) -> list[Tensor]:
    """Backward of one traced call: the gradients of the inputs and of the declared
    ``params`` that ``needs`` asks for (in that order), from a re-run of the block on the
    token's record. ``in_place``: no parameter is declared; the re-run's backward adds the
    block's parameter gradients to their ``.grad`` (see the module docstring)."""
    wrapper = site(key)
    name = wrapper.site.name
    record = record_of(token, name)
    check_versions(name, record.versions)
    n = len(record.inputs)
    if in_place:
        _check_plain_backward(name)
    inputs = record.rebuild()
    devices = cuda_devices(inputs)
    with contextlib.ExitStack() as stack:
        stack.enter_context(restore_buffers(wrapper.wrapped.modules()))
        stack.enter_context(torch.random.fork_rng(devices=devices))
        before = _rng_states(devices)
        stack.enter_context(_recomputing())
        for device, dtype in record.autocast:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        declared = [p for p, need in zip(params, needs[n:], strict=True) if need]
        got = gradients(wrapper, lay, present, inputs, needs[:n], grads, declared, in_place,
                        record.seed)
        after = _rng_states(devices)
    wrt = [x for x, need in zip(inputs, needs[:n], strict=True) if need] + declared
    if any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)):
        raise LaserFxError(
            f"The block {name} draws random numbers other than through F.dropout (an "
            "nn.Dropout) or the dropout of F.scaled_dot_product_attention. Under "
            "torch.compile its forward ran inside the compiled graph with the graph's own "
            "random stream, which the backward re-run cannot replay, so its gradients would "
            "be for other random draws. Use nn.Dropout for the randomness (its masks are "
            "seeded per call and replayed), exclude the block (`exclude=`), or "
            "compile without laser_fx."
        )
    # an op's outputs may not alias its inputs nor each other (``h + inject`` hands the
    # incoming gradient straight back, to both inputs)
    taken = {t.untyped_storage().data_ptr() for t in (*grads, *params)}
    out = []
    for x, g in zip(wrt, got, strict=True):
        if g is None:
            g = torch.zeros_like(x)
        elif g.untyped_storage().data_ptr() in taken:
            g = g.clone()
        taken.add(g.untyped_storage().data_ptr())
        out.append(g)
    return out


def _check_plain_backward(name: str) -> None:
    if not torch.autograd._is_checkpoint_valid():
        raise LaserFxError(
            f"The compressed checkpoint of {name} runs traced in a compiled graph, where its "
            "backward adds the block's parameter gradients to their .grad (as torch's "
            "reentrant checkpoint does); torch.autograd.grad and backward(inputs=...) would "
            "not see them. Call loss.backward(), or register a gradient hook on one of the "
            "block's parameters before compiling (then the gradients go through autograd)."
        )


@rerun.register_fake
def _(key: int, token: Tensor, grads: list[Tensor], params: list[Tensor], metas: list[int],
      needs: list[bool], in_place: bool, lay: int, present: list[bool]) -> list[Tensor]:
    device = (grads or params)[0].device if (grads or params) else torch.device("cpu")
    shapes = _metas(metas)
    out = [torch.empty(shape, dtype=dtype, device=device)
           for (dtype, shape), need in zip(shapes, needs, strict=False) if need]
    out += [torch.empty_like(p) for p, need in zip(params, needs[len(shapes):], strict=True)
            if need]
    return out
