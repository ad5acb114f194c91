"""Compressed checkpoint: a call of a shared block keeps only its inputs, stored low-rank.

The forward runs the block on the exact inputs (so its output is bitwise the uncompressed
one); autograd keeps only the inputs, each packed by a `SubspaceTracker`; backward rebuilds
the inputs from the packs, re-runs the block with grad enabled (RNG and autocast state as in
the forward, buffers such as BatchNorm statistics put back afterwards) and backpropagates
into the inputs and the block's parameters.

Safety, at least as strict as ``torch.utils.checkpoint``:

* the forward runs with grad enabled under saved-tensor hooks that keep nothing, so an
  output the block returns detached (or that depends on no input requiring grad) comes back
  without a ``grad_fn``, exactly as from the plain block; the same hooks measure the bytes
  the uncompressed call would have kept (`StorageStats.uncompressed_bytes`);
* an input or a parameter modified in place between forward and backward raises in backward
  (version counters), instead of giving gradients at the new values;
* the re-run does not update buffers a second time.

Parameter gradients are accumulated in place under a plain ``backward()`` (see
`laser_fx.ops._param_grads`).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._isolated import cuda_devices, restore_buffers
from ..errors import ConfigError, LaserFxError
from ..packed import StorageStats, is_weight
from ._param_grads import accumulates_in_place, inside_ddp_forward, tensor_hooks_suspended
from ._tensors import check_declared, hidden_grad_tensors
from ._versions import check_versions, parameter_entries, versions_of

__all__ = ["compressed_checkpoint", "is_recomputing"]

_AUTOCAST_DEVICES = ("cpu", "cuda")
_local = threading.local()
#: marks where a tensor goes in a flat leaf list (None is a real leaf: HF's head_mask=None)
_HOLE = object()


def is_recomputing() -> bool:
    """Whether a compressed checkpoint is running its block on this thread (its forward,
    which keeps nothing, or its re-run for backward).

    Compressed ops called inside behave as their plain op: the forward keeps nothing and the
    re-run's graph is consumed at once, so compressing saves nothing and would feed the
    trackers twice.
    """
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    return [
        (d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)
    ]


class _Slot:
    """How one tensor input is packed: its tracker and the axis holding the features."""

    __slots__ = ("dim", "tracker")

    def __init__(self, tracker: Any, dim: int) -> None:
        self.tracker = tracker
        self.dim = dim


class _Run:
    """Everything about one call that is not a tensor input: kept on the autograd ctx."""

    def __init__(self, fn, spec, template, n_inputs, params, stats, preserve_rng, name,
                 buffer_modules) -> None:
        self.fn = fn
        self.spec = spec  # pytree spec of (args, kwargs)
        self.template = template  # flat leaves, tensors replaced by _HOLE
        self.n_inputs = n_inputs
        self.params = params
        self.stats = stats
        self.name = name
        self.buffer_modules = buffer_modules
        self.preserve_rng = preserve_rng
        self.devices: list[int] = []
        self.cpu_rng: torch.Tensor | None = None
        self.cuda_rng: list[torch.Tensor] = []
        self.autocast = _autocast_state()
        self.out_spec: Any = None
        self.out_leaves: list[Any] = []
        self.versions: list[tuple[str, weakref.ref, int]] = []
        self.under_ddp = inside_ddp_forward()

    def capture_rng(self, tensors: Sequence[torch.Tensor]) -> None:
        if not self.preserve_rng:
            return
        self.cpu_rng = torch.get_rng_state()
        self.devices = cuda_devices(tensors)
        self.cuda_rng = [torch.cuda.get_rng_state(d) for d in self.devices]

    def record_versions(self, inputs: Sequence[torch.Tensor]) -> None:
        entries = [(f"input {i} of shape {tuple(t.shape)}", t) for i, t in enumerate(inputs)]
        self.versions = versions_of(entries + parameter_entries(self.params))

    def check_versions(self) -> None:
        check_versions(self.name, self.versions)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """RNG and autocast state of the forward, for the re-run only (buffers: `backward`)."""
        with contextlib.ExitStack() as stack:
            if self.preserve_rng:
                stack.enter_context(torch.random.fork_rng(devices=self.devices))
                torch.set_rng_state(self.cpu_rng)
                for d, s in zip(self.devices, self.cuda_rng, strict=True):
                    torch.cuda.set_rng_state(s, d)
            for device, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            yield

    def call(self, inputs: Sequence[torch.Tensor]) -> Any:
        it = iter(inputs)
        leaves = [next(it) if a is _HOLE else a for a in self.template]
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.fn(*args, **kwargs)


def _drop_pack(
    stats: StorageStats | None, inputs: Sequence[torch.Tensor] = ()
) -> Callable[[torch.Tensor], None]:
    """Pack hook of the forward: keeps nothing, counts what plain autograd would keep.

    ``inputs`` are the detached leaves the block runs on: they look like weights (leaves
    requiring grad) but are activations that plain autograd would keep.
    """
    seen: dict[int, weakref.ref] = {}

    def pack(t: torch.Tensor) -> None:
        if stats is not None and (any(t is i for i in inputs) or not is_weight(t)):
            storage = t.untyped_storage()
            ref = seen.get(id(storage))
            if ref is None or ref() is not storage:  # ids of freed storages are reused
                seen[id(storage)] = weakref.ref(storage)
                stats.uncompressed_bytes += storage.nbytes()
        return None

    return pack


def _never_unpack(_: None) -> torch.Tensor:
    raise LaserFxError("internal: the forward pass of a compressed checkpoint kept no tensors.")


class _CompressedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: _Run, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = tensors[: run.n_inputs]
        ctx.run = run
        # Packed by the saved-tensor hooks installed around `apply`: the pack result, not the
        # input, is what autograd keeps, and it is freed with the graph.
        ctx.save_for_backward(*inputs)
        # Run with grad enabled (keeping nothing) so that each output's requires_grad is what
        # the plain block gives it: a detached output stays detached.
        probe = [
            t.detach().requires_grad_(t.requires_grad) if t.is_floating_point() or t.is_complex()
            else t.detach()
            for t in inputs
        ]
        # `_recomputing`: compressed ops inside (a region, a nested checkpoint) act as plain
        # ops here too, since nothing this run saves is kept (and their own hooks would hide
        # the saves from `_drop_pack`'s count).
        with _recomputing(), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(
            _drop_pack(run.stats, probe), _never_unpack
        ):
            out = run.call(probe)
        leaves, run.out_spec = tree_flatten(out)
        run.out_leaves = [_HOLE if isinstance(v, torch.Tensor) else v for v in leaves]
        outs = [v for v in leaves if isinstance(v, torch.Tensor)]
        ret = tuple(o.detach() for o in outs)
        frozen = [r for r, o in zip(ret, outs, strict=True) if not o.requires_grad]
        if frozen:
            ctx.mark_non_differentiable(*frozen)
        return ret

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        run: _Run = ctx.run
        if torch.is_grad_enabled():
            raise LaserFxError(
                f"The compressed checkpoint of {run.name} does not support create_graph=True "
                "(double backward): the block is re-run from a low-rank reconstruction of its "
                "inputs, so second derivatives through it would be wrong. Exclude the block "
                "(`exclude=`), or call backward without create_graph."
            )
        run.check_versions()
        saved = ctx.saved_tensors  # PyTorch's own error if the graph was already freed
        needs = ctx.needs_input_grad[1:]
        inputs = [
            s.detach().requires_grad_(bool(needs[i])) if s.is_floating_point() or s.is_complex()
            else s.detach()
            for i, s in enumerate(saved)
        ]
        # Buffers (BatchNorm statistics) the re-run updates are put back only after
        # autograd.grad below: the re-run saved them for its backward, and putting them back
        # bumps their version counters ("modified by an inplace operation").
        with restore_buffers(run.buffer_modules):
            return _CompressedCheckpoint._rerun_backward(run, inputs, grads, needs)

    @staticmethod
    def _rerun_backward(run: _Run, inputs: list[torch.Tensor], grads: Sequence[Any],
                        needs: Sequence[bool]) -> tuple[torch.Tensor | None, ...]:
        n = run.n_inputs
        with _recomputing(), torch.enable_grad(), run.replay():
            out = run.call(inputs)
        outs = [v for v in tree_flatten(out)[0] if isinstance(v, torch.Tensor)]
        pairs = [
            (o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad
        ]
        wrt_idx = [i for i in range(n) if needs[i]]
        wrt_idx += [n + j for j in range(len(run.params)) if needs[n + j]]
        every = inputs + list(run.params)
        result: list[torch.Tensor | None] = [None] * (n + len(run.params))
        if pairs and wrt_idx:
            check_declared(run.name, [o for o, _ in pairs], every)
            roots, root_grads = [o for o, _ in pairs], [g for _, g in pairs]
            params = [every[i] for i in wrt_idx if i >= n]
            if params and accumulates_in_place(params, run.under_ddp):
                # Like torch's reentrant checkpoint: the re-run's backward adds each parameter's
                # gradient to its .grad as soon as it is computed, so at most one parameter's
                # gradient of this call is alive beside .grad. The inputs are fresh leaves of
                # this re-run: their .grad is this call's input gradient, handed to autograd.
                wanted = [inputs[i] for i in wrt_idx if i < n]
                unique = list({id(p): p for p in params}.values())
                torch.autograd.backward(roots, root_grads, inputs=wanted + unique)
                for i in wrt_idx:
                    if i < n:
                        result[i] = inputs[i].grad
            else:
                with tensor_hooks_suspended(params):
                    got = torch.autograd.grad(
                        roots, [every[i] for i in wrt_idx], root_grads, allow_unused=True
                    )
                for i, g in zip(wrt_idx, got, strict=True):
                    result[i] = g
        return (None, *result)


def _resolve_trackers(trackers: Any, tensors: Sequence[torch.Tensor],
                      dims: Sequence[int]) -> list[Any]:
    """One tracker (or None: keep exact) per tensor input; widths read along ``dims``."""
    if callable(trackers) and not hasattr(trackers, "compress"):
        return [trackers(i, t) for i, t in enumerate(tensors)]
    if hasattr(trackers, "compress") and hasattr(trackers, "width"):
        trackers = {int(trackers.width): trackers}
    if isinstance(trackers, (Mapping, nn.ModuleDict)):
        by_width = {int(k): v for k, v in trackers.items()}
        return [
            by_width.get(t.shape[d]) if t.is_floating_point() and -t.ndim <= d < t.ndim
            else None
            for t, d in zip(tensors, dims, strict=True)
        ]
    if isinstance(trackers, (list, tuple, nn.ModuleList)):
        if len(trackers) != len(tensors):
            raise ConfigError(
                f"`trackers` given by position has {len(trackers)} entries for {len(tensors)} "
                "tensor inputs; give one tracker (or None) per tensor input (in the order "
                "pytree flattens (args, kwargs)), or a {width: tracker} map."
            )
        out = list(trackers)
        for i, (t, a, d) in enumerate(zip(out, tensors, dims, strict=True)):
            if t is not None and not (-a.ndim <= d < a.ndim and a.shape[d] == t.width):
                raise ConfigError(
                    f"tensor input {i} has shape {tuple(a.shape)} but its tracker has width "
                    f"{t.width}; pass None for that position or a tracker of matching width."
                )
        return out
    raise ConfigError(
        "`trackers` must be a tracker, a sequence of trackers/None (one per tensor input), a "
        f"{{width: tracker}} mapping or a callable (index, tensor) -> tracker, got "
        f"{type(trackers).__name__}."
    )


def _default_params(fn: Callable[..., Any]) -> list[torch.Tensor]:
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return [p for p in owner.parameters() if p.requires_grad]
    return []


def compressed_checkpoint(
    fn: Callable[..., Any],
    trackers: Any,
    *args: Any,
    params: Sequence[torch.Tensor] | None = None,
    preserve_rng_state: bool = True,
    stats: StorageStats | None = None,
    feature_dims: Sequence[int] | None = None,
    name: str | None = None,
    **kwargs: Any,
) -> Any:
    """Call ``fn(*args, **kwargs)`` keeping only its inputs, low-rank, for backward.

    The output equals ``fn(*args, **kwargs)`` bitwise (computed from the exact inputs), and
    each output tensor requires grad exactly when it does from ``fn`` itself. Backward
    reconstructs the tensor inputs from their packs, re-runs ``fn`` with grad enabled and the
    forward's RNG/autocast state (buffers of ``fn``, e.g. BatchNorm statistics, are put back
    after the re-run), and computes the gradients of the inputs and of ``params``: under a
    plain ``.backward()`` the parameter gradients are accumulated into ``.grad`` during the
    re-run's backward (no second full set of them at once); ``torch.autograd.grad(loss,
    params)``, ``backward(inputs=...)``, parameters with gradient hooks and DDP get them
    through autograd, as from the plain block (see the module docstring). With grad
    disabled, or when no input nor parameter requires grad, this is a plain call.

    Args:
        fn: the shared block (an ``nn.Module`` or any callable) applied to the inputs.
        trackers: which tracker packs which tensor input (the tensors pytree flattens out of
            ``(args, kwargs)``, in order): one tracker (used for every floating tensor of
            its width), a ``{width: tracker}`` mapping, a sequence with one tracker or None
            (kept exact) per tensor input, or a callable ``(index, tensor) -> tracker | None``.
        *args: positional inputs of ``fn`` (tensors in any pytree of lists, tuples, dicts).
        params: tensors ``fn`` reads that need gradients (default: the parameters that
            require grad of ``fn``, or of ``fn.__self__`` for a bound method). A tensor
            requiring grad that ``fn`` reads but that is not declared is an error in backward.
        preserve_rng_state: replay the forward's RNG state in the re-run (dropout).
        stats: optional `StorageStats` to add this call's bytes to (kept and uncompressed).
        feature_dims: per tensor input, the axis its tracker compresses along (default -1;
            1 for channels-first convolution inputs).
        name: how errors name the block (default: its class name).
        **kwargs: keyword inputs of ``fn``.

    Returns:
        What ``fn`` returns (tensors in any pytree of lists, tuples and dicts).

    Raises:
        ConfigError: a tensor requiring grad hides in a dataclass argument (pytree does not
            open dataclasses; its gradient would be lost).
        LaserFxError: in backward, when an input or parameter was modified in place after
            the forward, or ``fn`` reads an undeclared tensor requiring grad.

    Example::

        trk = SubspaceTracker(64, LaserConfig(rank=8))
        z = compressed_checkpoint(net, trk, z, y + x)   # both inputs of width 64
    """
    if not callable(fn):
        raise ConfigError(f"`fn` must be callable, got {type(fn).__name__}.")
    name = name or getattr(fn, "__name__", None) or type(fn).__name__
    declared = list(_default_params(fn) if params is None else params)
    leaves, spec = tree_flatten((args, kwargs))
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    wants_grad = any(t.requires_grad for t in tensors + declared)
    if not torch.is_grad_enabled() or not wants_grad or is_recomputing():
        return fn(*args, **kwargs)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            hidden = hidden_grad_tensors(leaf)
            if hidden:
                raise ConfigError(
                    f"An argument of {name} is a {type(leaf).__name__} holding tensors that "
                    f"require grad ({', '.join('<arg>' + h for h in hidden)}); the compressed "
                    "checkpoint cannot see inside it, so their gradients would be lost. Pass "
                    "those tensors as arguments, or register the class with "
                    "torch.utils._pytree.register_dataclass; for a key/value cache (Hugging "
                    "Face use_cache=True), build the model with use_cache=False."
                )
    dims = list(feature_dims) if feature_dims is not None else [-1] * len(tensors)
    if len(dims) != len(tensors):
        raise ConfigError(
            f"`feature_dims` has {len(dims)} entries for {len(tensors)} tensor inputs."
        )
    per_tensor = _resolve_trackers(trackers, tensors, dims)
    template = [_HOLE if isinstance(a, torch.Tensor) else a for a in leaves]
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    buffer_modules = list(owner.modules()) if isinstance(owner, nn.Module) else []
    run = _Run(fn, spec, template, len(tensors), declared, stats, preserve_rng_state, name,
               buffer_modules)
    run.capture_rng(tensors)
    # PyTorch packs a Function's saved tensors in `save_for_backward` order.
    queue = [None if t is None else _Slot(t, d) for t, d in zip(per_tensor, dims, strict=True)]

    def pack(t: torch.Tensor) -> Any:
        slot = queue.pop(0) if queue else None
        if slot is None:
            if stats is not None:
                stats.add_passthrough(t)
            return t
        moved = t if slot.dim in (-1, t.ndim - 1) else t.movedim(slot.dim, -1)
        packed = slot.tracker.compress(moved)
        if stats is not None:
            stats.add_packed(moved, packed)
        return (slot, packed)

    def unpack(h: Any) -> torch.Tensor:
        if isinstance(h, torch.Tensor):
            return h
        slot, packed = h
        x = slot.tracker.decompress(packed)
        return x if slot.dim in (-1, x.ndim - 1) else x.movedim(-1, slot.dim)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        flat = _CompressedCheckpoint.apply(run, *tensors, *declared)
    run.record_versions(tensors)
    if stats is not None:
        stats.calls += 1
    it = iter(flat)
    out_leaves = [next(it) if v is _HOLE else v for v in run.out_leaves]
    return tree_unflatten(out_leaves, run.out_spec)
