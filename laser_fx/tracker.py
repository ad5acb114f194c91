"""`SubspaceTracker`: the low-rank basis one site's activations are stored in.

One tracker serves every use of a weight-shared site (one recursion step per call). A call
projects the activation onto the current basis Q; when Q captures too little of its energy,
warm-started block subspace iteration refines Q, and when that is not enough the basis is
rebuilt from a (randomized or exact) SVD. Every basis change assigns a NEW tensor to the
``basis`` buffer, so each `Packed` keeps exactly the basis version it was projected with.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .config import LaserConfig
from .errors import ConfigError

__all__ = ["Packed", "StorageStats", "SubspaceTracker", "is_weight"]

#: exact SVD below this many rows or columns; randomized subspace iteration above.
_EXACT_MAX = 256
#: energy fraction treated as rounding noise, so that ``energy=1.0`` on exactly low-rank data
#: keeps its rank instead of every numerically-zero direction.
_TAIL_FLOOR = 1e-10
#: subspace iterations of a randomized reset (the usual niter=2 of randomized SVD).
_RESET_ITERS = 2
#: CPU problems up to this many elements run their factorizations on one thread (see below).
_SMALL_CPU = 1 << 18
_SEED = 0x1A5E2
#: in energy mode, coefficients above this fraction of the dense bytes are not worth the
#: tracking: store dense and skip the next `_BACKOFF` calls (high-rank activations, e.g. at
#: random init, would otherwise pay a basis update on every call for a small saving). Each
#: further incompressible try in a row doubles the skip, up to `_BACKOFF_MAX` calls, so a
#: site that stays high-rank costs a reset every few hundred calls, not every eighth.
_INCOMPRESSIBLE = 0.75
_BACKOFF = 8
_BACKOFF_MAX = 256
_COUNTERS = ("calls", "resets", "power_updates", "shrinks", "nonfinite", "dense_stores")


class Packed:
    """One stored activation: coefficients with the basis version they belong to, or dense.

    Attributes:
        coeffs: ``(N, k)`` coefficients ``C = (X - 1 mᵀ) Q`` (None when stored dense).
        dense: the activation itself, detached (None when stored low-rank).
        basis: the ``(width, k)`` fp32 basis version ``Q`` the coefficients belong to.
        mean: the ``(width,)`` row mean ``m`` taken out before projecting (None: not centered).
        shape: original shape of the activation.
        dtype: original dtype of the activation.
    """

    __slots__ = ("basis", "coeffs", "dense", "dtype", "mean", "shape")

    def __init__(
        self,
        *,
        shape: torch.Size,
        dtype: torch.dtype,
        coeffs: Tensor | None = None,
        basis: Tensor | None = None,
        dense: Tensor | None = None,
        mean: Tensor | None = None,
    ) -> None:
        self.coeffs = coeffs
        self.basis = basis
        self.dense = dense
        self.mean = mean
        self.shape = shape
        self.dtype = dtype

    @property
    def is_dense(self) -> bool:
        """Whether the activation is stored as it is (exactly)."""
        return self.dense is not None

    @property
    def nbytes(self) -> int:
        """Bytes of what this record stores, basis excluded (it is shared between records)."""
        if self.dense is not None:
            return self.dense.numel() * self.dense.element_size()
        extra = 0 if self.mean is None else self.mean.numel() * self.mean.element_size()
        return self.coeffs.numel() * self.coeffs.element_size() + extra

    def __repr__(self) -> str:
        how = "dense" if self.is_dense else f"rank={self.coeffs.shape[1]}"
        return f"Packed(shape={tuple(self.shape)}, dtype={self.dtype}, {how}, nbytes={self.nbytes})"


def _compact(t: Tensor) -> Tensor:
    """``t`` in its own storage, so that a kept slice does not pin a larger buffer alive."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def _single_thread_if_small(x: Tensor) -> Iterator[None]:
    """Run small CPU factorizations on one thread.

    A QR/SVD of a few-thousand-element matrix gains nothing from threads, but it runs many
    short parallel regions; on an oversubscribed CPU each can stall on a descheduled thread
    (measured: 0.3-1.4 s instead of 0.1 ms per update on a loaded 2-core machine).
    """
    threads = torch.get_num_threads()
    if x.device.type != "cpu" or x.numel() > _SMALL_CPU or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _orthonormal(m: Tensor) -> Tensor:
    return torch.linalg.qr(m, mode="reduced").Q


def _subspace_iteration(x: Tensor, start: Tensor, iters: int) -> Tensor:
    """Orthonormal basis of ``(XᵀX)^iters · start``; matrix-free (never forms XᵀX)."""
    q = _orthonormal(start)
    for _ in range(iters):
        q = _orthonormal(x.T @ (x @ q))
    return q


def _ritz(x: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Best directions of ``x`` inside span(q), sorted by captured energy.

    Returns:
        (energies fp64, basis ``q V``, coefficients ``x q V``): the coefficients come from the
        small SVD, so the caller needs no further projection.
    """
    u, s, vh = torch.linalg.svd(x @ q, full_matrices=False)
    return s.double().square(), q @ vh.T, u * s


class SubspaceTracker(nn.Module):
    """Tracked low-rank basis of one site's activations (last dim = ``width``).

    All state lives in registered buffers, so ``state_dict``/``load_state_dict`` (also from a
    tracker of another rank), ``.to()``, ``deepcopy`` and ``torch.load(weights_only=True)``
    work. Counters ``stored_bytes``/``dense_bytes`` cover the calls since `begin_step`;
    ``stored_bytes`` counts coefficients (or dense copies), not basis versions.

    Args:
        width: size of the last dim of every activation this tracker compresses.
        config: the site's `LaserConfig` (energy or fixed rank, fidelity, power_iters, ...).

    Example::

        tracker = SubspaceTracker(64, LaserConfig(energy=0.99))
        packed = tracker.compress(x)          # x: (..., 64)
        x_hat = tracker.decompress(packed)
    """

    basis: Tensor

    def __init__(self, width: int, config: LaserConfig) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"`width` must be an integer >= 1, got {width!r}.")
        if not isinstance(config, LaserConfig):
            raise ConfigError(f"`config` must be a LaserConfig, got {type(config).__name__}.")
        self.width = width
        self.config = config
        self.register_buffer("basis", torch.zeros(width, 0))
        self.register_buffer("rank", torch.zeros((), dtype=torch.int64))
        for name in (*_COUNTERS, "stored_bytes", "dense_bytes"):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_fidelity", torch.ones(()))
        self.register_buffer("min_fidelity", torch.ones(()))
        # captured energy right after the last reset (the fixed-rank trigger is relative to it)
        self.register_buffer("reset_fidelity", torch.ones(()))
        # calls left to store dense without trying (after an incompressible activation)
        self.register_buffer("backoff", torch.zeros((), dtype=torch.int64))
        # the next back-off's length (doubles while tries keep failing); a plain int, not
        # a buffer: no device op per call, and not part of the saved state
        self.backoff_next = _BACKOFF

    def extra_repr(self) -> str:
        return f"width={self.width}, rank={self.basis.shape[1]}"

    # ------------------------------------------------------------------ public API
    def begin_step(self) -> None:
        """Zero the stored/dense byte counters (call once per training step)."""
        self.stored_bytes.zero_()
        self.dense_bytes.zero_()

    def stats(self) -> dict[str, int | float]:
        """Current rank, counters, fidelities and byte counts as plain Python numbers."""
        out: dict[str, int | float] = {"rank": int(self.basis.shape[1])}
        for name in (*_COUNTERS, "stored_bytes", "dense_bytes"):
            out[name] = int(getattr(self, name))
        out["last_fidelity"] = float(self.last_fidelity)
        out["min_fidelity"] = float(self.min_fidelity)
        return out

    # torch.compile: the tracker is data-dependent Python (ranks, norms); dynamo would
    # recompile it per width/rank until its limit, then run it eagerly anyway
    @torch.compiler.disable
    @torch.no_grad()
    def compress(self, x: Tensor) -> Packed:
        """Store ``x`` (any leading dims, last dim ``width``) in the tracked basis.

        Updates the basis when it captures less than ``config.fidelity`` of ``x``'s energy.
        Non-finite, tiny (< ``config.min_numel``) or not-compressible ``x`` is stored dense
        and leaves the basis untouched (non-finite values never reach the buffers).

        Args:
            x: the activation; floating point, on the tracker's device.

        Returns:
            `Packed` record for `decompress`.
        """
        if x.ndim == 0 or x.shape[-1] != self.width:
            got = "a scalar" if x.ndim == 0 else f"last dim {x.shape[-1]}"
            raise ConfigError(
                f"SubspaceTracker of width {self.width} got an activation with {got} "
                f"(shape {tuple(x.shape)}); a tracker compresses tensors whose last dim is its "
                "width. Build one tracker per site width."
            )
        if not x.is_floating_point():
            raise ConfigError(f"SubspaceTracker compresses floating-point tensors, got {x.dtype}.")
        if x.device != self.basis.device:
            raise ConfigError(
                f"SubspaceTracker buffers are on {self.basis.device} but the activation is on "
                f"{x.device}; move the model (and its trackers) with `.to({str(x.device)!r})`."
            )
        self.calls.add_(1)
        x = x.detach()
        self.dense_bytes.add_(x.numel() * x.element_size())
        if x.numel() < self.config.min_numel:
            return self._store_dense(x)
        if int(self.backoff) > 0:
            self.backoff.sub_(1)
            return self._store_dense(x)
        xm = x.reshape(-1, self.width).float()
        mean = None
        if self.config.center:  # a component shared by every row is kept exactly, aside
            mean = xm.mean(0)
            xm = xm - mean
        total = float(torch.linalg.vector_norm(xm).square())
        if not math.isfinite(total):
            self.nonfinite.add_(1)
            return self._store_dense(x)
        k = self.basis.shape[1]
        if total == 0.0:
            if k == 0:  # nothing to build a basis from: keep it exactly, state untouched
                return self._store_dense(x)
            return self._finish(x, self.basis, xm.new_zeros(xm.shape[0], k), 1.0, mean)
        threshold = self.threshold()
        if k > 0:
            coeffs = xm @ self.basis
            fid = min(1.0, float(coeffs.square().sum()) / total)
            if fid >= threshold:
                return self._shrink_and_finish(x, coeffs, fid, total, mean)
        with _single_thread_if_small(xm):
            if k > 0 and self.config.power_iters > 0 and k < self.width:
                self.power_updates.add_(1)
                basis, coeffs, fid = self._power_update(xm, total)
                if fid >= threshold:
                    return self._finish(x, basis, coeffs, fid, mean)
            basis, coeffs, fid = self._reset(xm, total)  # first call, or tracking failed
            self.reset_fidelity.fill_(fid)
        return self._finish(x, basis, coeffs, fid, mean)

    def threshold(self) -> float:
        """Captured-energy fraction below which the basis is updated (see `LaserConfig`)."""
        if self.config.fidelity is not None:
            return self.config.fidelity
        if self.config.rank is None:
            return self.config.energy
        return min(self.config.energy, 0.98 * float(self.reset_fidelity))

    def decompress(self, p: Packed) -> Tensor:
        """Reconstruction ``X̂ = C Qᵀ`` in the original shape and dtype (exact if dense).

        Args:
            p: a record returned by this tracker's `compress`.

        Returns:
            Tensor shaped and typed like the compressed activation.
        """
        if p.dense is not None:
            return p.dense
        with torch.no_grad():
            x_hat = p.coeffs.to(p.basis.dtype) @ p.basis.T
            if p.mean is not None:
                x_hat += p.mean.to(x_hat.dtype)
        return x_hat.reshape(p.shape).to(p.dtype)

    # ------------------------------------------------------------------ internals
    def _generator(self, device: torch.device) -> torch.Generator:
        # A private, seeded generator: the tracker must not consume the global RNG stream,
        # or a compressed model would draw different dropout masks than the original.
        gen = torch.Generator(device=device)
        gen.manual_seed(_SEED + int(self.calls))
        return gen

    def _random(self, rows: int, cols: int, like: Tensor) -> Tensor:
        gen = self._generator(like.device)
        return torch.randn(rows, cols, generator=gen, device=like.device, dtype=like.dtype)

    def _power_update(self, xm: Tensor, total: float) -> tuple[Tensor, Tensor, float]:
        """Warm-started block subspace iteration on ``[Q, random]``, keeping the top k."""
        k = self.basis.shape[1]
        extra = min(self.config.oversample, self.width - k)
        start = self.basis
        if extra > 0:
            start = torch.cat([self.basis, self._random(self.width, extra, xm)], dim=1)
        q = _subspace_iteration(xm, start, self.config.power_iters)
        energies, basis, coeffs = _ritz(xm, q)
        keep = k
        if self.config.rank is None:
            # energy mode: the rank follows the data both ways. The oversampled columns'
            # energies are exact for the directions they span, so when the kept energy
            # needs up to `oversample` more directions they are taken instead of a reset;
            # directions no longer needed are dropped.
            need = self._pick_from_prefix(energies, total)
            keep = need if need is not None else k
        return basis[:, :keep], coeffs[:, :keep], float(energies[:keep].sum()) / total

    def _reset(self, xm: Tensor, total: float) -> tuple[Tensor, Tensor, float]:
        """Rebuild the basis: smallest k keeping ``energy`` (or the fixed rank)."""
        self.resets.add_(1)
        n, d = xm.shape
        full = min(n, d)
        fixed = self.config.target_rank(d)
        p = self.config.oversample
        q = (fixed if fixed is not None else max(2 * self.basis.shape[1], 16)) + p
        while full > _EXACT_MAX and 2 * q <= full:
            start = self.basis[:, : min(self.basis.shape[1], q)]
            start = torch.cat([start, self._random(d, q - start.shape[1], xm)], dim=1)
            energies, basis, coeffs = _ritz(xm, _subspace_iteration(xm, start, _RESET_ITERS))
            # only the leading q - p Ritz values are reliable after two iterations
            k = fixed if fixed is not None else self._pick_from_prefix(energies[: q - p], total)
            if k is None and self._cap(d) <= q - p:
                k = self._cap(d)  # max_rank reached: more columns cannot help
            if k is not None:
                return basis[:, :k], coeffs[:, :k], min(1.0, float(energies[:k].sum()) / total)
            q *= 2
        u, s, vh = torch.linalg.svd(xm, full_matrices=False)
        energies = s.double().square()
        k = fixed if fixed is not None else self._pick_exhaustive(energies, d)
        k = min(k, energies.numel())
        captured = float(energies[:k].sum()) / max(float(energies.sum()), 1e-300)
        return vh[:k].T, u[:, :k] * s[:k], min(1.0, captured)

    def _cap(self, d: int) -> int:
        return min(d, self.config.max_rank or d)

    def _pick_from_prefix(self, energies: Tensor, total: float) -> int | None:
        """Smallest k whose leading energies reach ``energy * total``; None if none does."""
        need = min(self.config.energy, 1.0 - _TAIL_FLOOR) * total
        hits = torch.nonzero(torch.cumsum(energies, 0) >= need)
        if hits.numel() == 0:
            return None
        return min(int(hits[0]) + 1, self._cap(self.width))

    def _pick_exhaustive(self, energies: Tensor, d: int) -> int:
        """Smallest k whose dropped tail is within ``1 - energy`` of a full spectrum."""
        tail = torch.flip(torch.cumsum(torch.flip(energies, [0]), 0), [0])  # tail[k] = sum e[k:]
        tail = torch.cat([tail[1:], tail.new_zeros(1)])  # tail after keeping k+1 directions
        budget = (1.0 - self.config.energy + _TAIL_FLOOR) * float(energies.sum())
        k = int(torch.nonzero(tail <= budget)[0]) + 1
        return min(k, self._cap(d))

    def _shrink_and_finish(
        self, x: Tensor, coeffs: Tensor, fid: float, total: float, mean: Tensor | None
    ) -> Packed:
        # Columns are ordered by energy (SVD / Ritz order), so a prefix that already keeps
        # `energy` makes the rest unnecessary: the rank follows data that concentrates.
        basis = self.basis
        if self.config.rank is None and basis.shape[1] > 1:
            k = self._pick_from_prefix(coeffs.double().square().sum(0), total)
            if k is not None and k < basis.shape[1]:
                self.shrinks.add_(1)
                coeffs, basis = coeffs[:, :k], basis[:, :k]
                fid = min(1.0, float(coeffs.square().sum()) / total)
        return self._finish(x, basis, coeffs, fid, mean)

    def _finish(
        self, x: Tensor, basis: Tensor, coeffs: Tensor, fid: float, mean: Tensor | None
    ) -> Packed:
        """Adopt ``basis`` (a new buffer tensor if it changed) and store the coefficients."""
        new_basis = basis is not self.basis
        if new_basis:
            self.basis = _compact(basis.float())  # assign, never in place: old Packed keep theirs
            self.rank.fill_(basis.shape[1])
        fid = min(1.0, max(0.0, fid))  # rounding can leave a hair outside [0, 1]
        store = self.config.store_dtype or x.dtype
        packed = Packed(
            shape=x.shape, dtype=x.dtype, coeffs=coeffs.to(store), basis=self.basis,
            mean=None if mean is None else mean.to(store),
        )
        # a record (coefficients, centered mean) not smaller than x: keep x itself, exactly
        x_bytes = x.numel() * x.element_size()
        dense = packed.nbytes >= x_bytes
        if self.config.rank is None:  # energy mode: back off from incompressible activations
            # A record that brings a new basis version pins it too: with few rows (a small
            # batch of RNN states) coefficients plus basis can outgrow the activation.
            cost = packed.nbytes + (self.basis.numel() * self.basis.element_size()
                                    if new_basis else 0)
            dense = cost > _INCOMPRESSIBLE * x_bytes
            if dense:  # forget the basis too: the next try starts cold (a fresh reset)
                self.backoff.fill_(self.backoff_next)
                self.backoff_next = min(2 * self.backoff_next, _BACKOFF_MAX)
                self.basis = self.basis.new_zeros(self.width, 0)
                self.rank.zero_()
            else:
                self.backoff_next = _BACKOFF
        fid = 1.0 if dense else fid
        self.last_fidelity.fill_(fid)
        self.min_fidelity.clamp_(max=fid)
        if dense:
            return self._store_dense(x)
        packed.coeffs = _compact(packed.coeffs)  # a kept slice must not pin a larger buffer
        self.stored_bytes.add_(packed.nbytes)
        return packed

    def _store_dense(self, x: Tensor) -> Packed:
        self.dense_stores.add_(1)
        packed = Packed(shape=x.shape, dtype=x.dtype, dense=x)
        self.stored_bytes.add_(packed.nbytes)
        return packed

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        # The rank is data-dependent: adopt the saved basis shape before the copy, so a state
        # of another rank loads (a different width still fails with torch's size message).
        saved = state_dict.get(prefix + "basis")
        if isinstance(saved, Tensor) and saved.ndim == 2 and saved.shape[0] == self.width:
            self.basis = torch.empty(saved.shape, dtype=torch.float32, device=self.basis.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )


def _nbytes(obj: object) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    return int(getattr(obj, "nbytes", 0) or 0)


def is_weight(t: Tensor) -> bool:
    """A parameter, a leaf requiring grad, or a view of one (``w.t()`` saved by ``linear``):
    what autograd saves of it is no activation, and no mechanism stores or counts it."""
    base = t if t._base is None else t._base
    return isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad)


@dataclass
class StorageStats:
    """Byte accounting of what compressed calls kept for backward (one training step).

    Attributes:
        uncompressed_bytes: what the same calls would have kept uncompressed (distinct
            saved tensors, parameters excluded), measured by saved-tensor hooks as they ran.
        seen_bytes: dense bytes of every distinct tensor the compressed calls saved.
        dense_bytes: dense bytes of the saved tensors routed to a tracker.
        stored_bytes: bytes of what the trackers returned for them (`Packed.nbytes`).
        passthrough_bytes: bytes of saved tensors kept as they are (parameters excluded).
        packed: number of tensors routed to a tracker; ``deduped``: saves served by an
            earlier pack of the same tensor.
        calls: compressed calls counted.
    """

    uncompressed_bytes: int = 0
    seen_bytes: int = 0
    dense_bytes: int = 0
    stored_bytes: int = 0
    passthrough_bytes: int = 0
    packed: int = 0
    deduped: int = 0
    calls: int = 0
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

    def add_packed(self, dense: Tensor, packed: Any) -> None:
        """Record that `dense` was stored as `packed`."""
        self.seen_bytes += _nbytes(dense)
        self.dense_bytes += _nbytes(dense)
        self.stored_bytes += _nbytes(packed)
        self.packed += 1
        basis = getattr(packed, "basis", None)
        if basis is not None and not getattr(packed, "is_dense", False):
            self._bases.setdefault(id(basis), basis)

    def add_passthrough(self, t: Tensor) -> None:
        """Record a saved tensor kept as it is (parameters are not activations: skipped)."""
        if is_weight(t):
            return
        self.seen_bytes += _nbytes(t)
        self.passthrough_bytes += _nbytes(t)

    def to_dict(self) -> dict[str, int]:
        """Plain-dict view (for reports)."""
        keys = ("uncompressed_bytes", "seen_bytes", "dense_bytes", "stored_bytes",
                "passthrough_bytes", "packed", "deduped", "calls")
        out = {k: getattr(self, k) for k in keys}
        out.update(basis_bytes=self.basis_bytes, total_stored_bytes=self.total_stored_bytes)
        return out
