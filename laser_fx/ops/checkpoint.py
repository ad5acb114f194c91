"""Compressed checkpoint: a call of a shared block keeps only its inputs, stored low-rank.

The forward runs the block on the exact inputs (so its output is bitwise the uncompressed
one); autograd keeps only the inputs, each packed by a `SubspaceTracker`; backward rebuilds
the inputs from the packs, re-runs the block with grad enabled (RNG and autocast state as in
the forward) and backpropagates into the inputs and the block's parameters.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import ConfigError, LaserFxError

__all__ = ["StorageStats", "compressed_checkpoint", "is_recomputing"]

_AUTOCAST_DEVICES = ("cpu", "cuda")
_local = threading.local()


def is_recomputing() -> bool:
    """Whether a compressed checkpoint is re-running its block for backward on this thread.

    Compressed ops called during that re-run behave as their plain op: the re-run's graph is
    consumed at once, so compressing it saves nothing and would feed the trackers twice.
    """
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return int(getattr(obj, "nbytes", 0) or 0)


@dataclass
class StorageStats:
    """Byte accounting of what a compressed op kept for backward.

    Attributes:
        seen_bytes: dense bytes of every distinct saved tensor (parameters excluded).
        dense_bytes: dense bytes of the saved tensors routed to a tracker.
        stored_bytes: bytes of what the trackers returned for them (`Packed.nbytes`).
        passthrough_bytes: bytes of saved tensors kept as they are (parameters excluded).
        packed: number of tensors routed to a tracker; ``deduped``: saves served by an
            earlier pack of the same tensor.
    """

    seen_bytes: int = 0
    dense_bytes: int = 0
    stored_bytes: int = 0
    passthrough_bytes: int = 0
    packed: int = 0
    deduped: int = 0
    # Distinct basis versions referenced by the packs, by identity; kept alive while the
    # stats object lives so that ids are not reused.
    _bases: dict[int, Any] = field(default_factory=dict, repr=False)

    @property
    def basis_bytes(self) -> int:
        """Bytes of the distinct bases the packs refer to."""
        return sum(_nbytes(b) for b in self._bases.values())

    @property
    def total_stored_bytes(self) -> int:
        """Everything kept: packs, their bases, and the tensors kept as they are."""
        return self.stored_bytes + self.basis_bytes + self.passthrough_bytes

    def add_packed(self, dense: torch.Tensor, packed: Any) -> None:
        """Record that `dense` was stored as `packed`."""
        self.seen_bytes += _nbytes(dense)
        self.dense_bytes += _nbytes(dense)
        self.stored_bytes += _nbytes(packed)
        self.packed += 1
        basis = getattr(packed, "basis", None)
        if basis is not None:
            self._bases.setdefault(id(basis), basis)

    def add_passthrough(self, t: torch.Tensor) -> None:
        """Record a saved tensor kept as it is (parameters are not activations: skipped)."""
        if isinstance(t, nn.Parameter) or (t.is_leaf and t.requires_grad):
            return
        self.seen_bytes += _nbytes(t)
        self.passthrough_bytes += _nbytes(t)

    def to_dict(self) -> dict[str, int]:
        """Plain-dict view (for reports)."""
        keys = ("seen_bytes", "dense_bytes", "stored_bytes", "passthrough_bytes", "packed")
        out = {k: getattr(self, k) for k in keys}
        out.update(deduped=self.deduped, basis_bytes=self.basis_bytes)
        return out


def _resolve_trackers(trackers: Any, args: Sequence[Any]) -> list[Any]:
    """One tracker (or None: keep exact) per positional argument."""
    if hasattr(trackers, "compress") and hasattr(trackers, "width"):
        trackers = {int(trackers.width): trackers}
    if isinstance(trackers, (Mapping, nn.ModuleDict)):
        by_width = {int(k): v for k, v in trackers.items()}
        return [
            by_width.get(a.shape[-1])
            if isinstance(a, torch.Tensor) and a.is_floating_point() and a.ndim >= 1
            else None
            for a in args
        ]
    if isinstance(trackers, (list, tuple, nn.ModuleList)):
        if len(trackers) != len(args):
            raise ConfigError(
                f"`trackers` given by position has {len(trackers)} entries for {len(args)} "
                "arguments; give one tracker (or None) per argument, or a {width: tracker} map."
            )
        out = list(trackers)
        for i, (t, a) in enumerate(zip(out, args, strict=True)):
            if t is None:
                continue
            if not isinstance(a, torch.Tensor) or a.shape[-1:] != (t.width,):
                got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                raise ConfigError(
                    f"argument {i} has shape {got} but its tracker has width {t.width}; "
                    "pass None for that position or a tracker of matching width."
                )
        return out
    raise ConfigError(
        "`trackers` must be a tracker, a sequence of trackers/None (by position) or a "
        f"{{width: tracker}} mapping, got {type(trackers).__name__}."
    )


def _default_params(fn: Callable[..., Any]) -> list[torch.Tensor]:
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return [p for p in owner.parameters() if p.requires_grad]
    return []


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    return [
        (d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)
    ]


def _undeclared_leaves(roots: Iterable[torch.Tensor], allowed: set[int]) -> list[torch.Tensor]:
    """Leaves requiring grad that the re-run reaches but that are not Function inputs."""
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    while stack and len(found) < 4:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None:
            if id(var) not in allowed:
                found.append(var)
            continue
        stack.extend(n for n, _ in node.next_functions)
    return found


class _Run:
    """Everything about one call that is not a tensor input: kept on the autograd ctx."""

    def __init__(self, fn, template, n_inputs, kwargs, params, stats, preserve_rng) -> None:
        self.fn = fn
        self.template = template  # positional args, tensors replaced by None
        self.n_inputs = n_inputs
        self.kwargs = kwargs
        self.params = params
        self.stats = stats
        self.devices: list[int] = []
        self.preserve_rng = preserve_rng
        self.cpu_rng: torch.Tensor | None = None
        self.cuda_rng: list[torch.Tensor] = []
        self.autocast = _autocast_state()
        self.out_spec: Any = None
        self.out_leaves: list[Any] = []

    def capture_rng(self, tensors: Sequence[torch.Tensor]) -> None:
        if not self.preserve_rng:
            return
        self.cpu_rng = torch.get_rng_state()
        self.devices = sorted({t.get_device() for t in tensors if t.is_cuda})
        self.cuda_rng = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """RNG and autocast state of the forward, restored for the re-run only."""
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
        args = [next(it) if a is None else a for a in self.template]
        return self.fn(*args, **self.kwargs)


class _CompressedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: _Run, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = tensors[: run.n_inputs]
        ctx.run = run
        # Packed by the saved-tensor hooks installed around `apply`: the pack result, not the
        # input, is what autograd keeps, and it is freed with the graph.
        ctx.save_for_backward(*inputs)
        out = run.call(inputs)  # grad is disabled here: no graph, exact inputs
        leaves, run.out_spec = tree_flatten(out)
        run.out_leaves = [None if isinstance(v, torch.Tensor) else v for v in leaves]
        return tuple(v for v in leaves if isinstance(v, torch.Tensor))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise LaserFxError(
                "compressed checkpoints do not support create_graph=True (double backward): "
                "the block is re-run from a low-rank reconstruction of its inputs, so second "
                "derivatives through it would be wrong. Exclude the block (`exclude=`), use "
                "mode='region' for it, or call backward without create_graph."
            )
        run: _Run = ctx.run
        saved = ctx.saved_tensors  # PyTorch's own error if the graph was already freed
        n = run.n_inputs
        needs = ctx.needs_input_grad[1:]
        inputs = [s.detach().requires_grad_(bool(needs[i])) for i, s in enumerate(saved)]
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
            stray = _undeclared_leaves((o for o, _ in pairs), {id(t) for t in every})
            if stray:
                shapes = ", ".join(str(tuple(t.shape)) for t in stray)
                raise LaserFxError(
                    f"The checkpointed block reads tensors that require grad but were not "
                    f"passed to compressed_checkpoint (shapes {shapes}); their gradients would "
                    "be lost. Pass them with `params=[...]` or as positional inputs."
                )
            got = torch.autograd.grad(
                [o for o, _ in pairs],
                [every[i] for i in wrt_idx],
                [g for _, g in pairs],
                allow_unused=True,
            )
            for i, g in zip(wrt_idx, got, strict=True):
                result[i] = g
        return (None, *result)


def compressed_checkpoint(
    fn: Callable[..., Any],
    trackers: Any,
    *args: Any,
    params: Sequence[torch.Tensor] | None = None,
    preserve_rng_state: bool = True,
    stats: StorageStats | None = None,
    **kwargs: Any,
) -> Any:
    """Call ``fn(*args, **kwargs)`` keeping only its inputs, low-rank, for backward.

    The output equals ``fn(*args, **kwargs)`` bitwise (computed from the exact inputs).
    Backward reconstructs the tensor inputs from their packs, re-runs ``fn`` with grad
    enabled and the forward's RNG/autocast state, and returns gradients for the inputs and
    for ``params``, so ``torch.autograd.grad(loss, params)`` works as well as ``.backward()``.
    With grad disabled, or when no input nor parameter requires grad, this is a plain call.

    Do not open a `compressed_region` inside ``fn``: the forward runs without grad and the
    re-run in backward is never compressed (`is_recomputing`), so it would do nothing.

    Args:
        fn: the shared block (an ``nn.Module`` or any callable) applied to ``args``.
        trackers: which tracker packs which input: one tracker (used for every floating
            tensor argument of its width), a ``{width: tracker}`` mapping, or a sequence
            with one tracker or None (kept exact) per positional argument.
        *args: positional inputs of ``fn``; tensors become inputs of the autograd node,
            anything else passes through.
        params: tensors ``fn`` reads that need gradients (default: the parameters that
            require grad of ``fn``, or of ``fn.__self__`` for a bound method). A tensor
            requiring grad that ``fn`` reads but that is not declared is an error in backward.
        preserve_rng_state: replay the forward's RNG state in the re-run (dropout).
        stats: optional `StorageStats` to add this call's stored bytes to.
        **kwargs: keyword arguments of ``fn``; they must not be tensors requiring grad.

    Returns:
        What ``fn`` returns (tensors in any pytree of lists, tuples and dicts).

    Example::

        trk = SubspaceTracker(64, LaserConfig(rank=8))
        z = compressed_checkpoint(net, trk, z, y + x)   # both inputs of width 64
    """
    if not callable(fn):
        raise ConfigError(f"`fn` must be callable, got {type(fn).__name__}.")
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            raise ConfigError(
                f"keyword argument `{k}` is a tensor requiring grad; pass it positionally so "
                "that it gets a gradient."
            )
    declared = list(_default_params(fn) if params is None else params)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    wants_grad = any(t.requires_grad for t in tensors + declared)
    if not torch.is_grad_enabled() or not wants_grad or is_recomputing():
        return fn(*args, **kwargs)
    per_arg = _resolve_trackers(trackers, args)
    per_tensor = [t for a, t in zip(args, per_arg, strict=True) if isinstance(a, torch.Tensor)]
    template = [None if isinstance(a, torch.Tensor) else a for a in args]
    run = _Run(fn, template, len(tensors), kwargs, declared, stats, preserve_rng_state)
    run.capture_rng(tensors)
    # PyTorch packs a Function's saved tensors in `save_for_backward` order.
    queue = list(per_tensor)

    def pack(t: torch.Tensor) -> Any:
        tracker = queue.pop(0) if queue else None
        if tracker is None:
            if stats is not None:
                stats.add_passthrough(t)
            return t
        packed = tracker.compress(t)
        if stats is not None:
            stats.add_packed(t, packed)
        return (tracker, packed)

    def unpack(h: Any) -> torch.Tensor:
        if isinstance(h, torch.Tensor):
            return h
        tracker, packed = h
        return tracker.decompress(packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        flat = _CompressedCheckpoint.apply(run, *tensors, *declared)
    it = iter(flat)
    leaves = [next(it) if v is None else v for v in run.out_leaves]
    return tree_unflatten(leaves, run.out_spec)
