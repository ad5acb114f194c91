"""What a stored activation is (`Packed`) and how the bytes kept for backward are counted
(`StorageStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Packed", "StorageStats", "is_weight", "nbytes"]


def nbytes(obj: object) -> int:
    """Bytes of a tensor's elements, or an object's ``nbytes`` (0 when it has none)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    return int(getattr(obj, "nbytes", 0) or 0)


class Packed:
    """One stored activation: coefficients with the basis version they belong to, or dense.

    A record may be *revised* once after it was made (`revise`): the tracker decides about a
    call one call late (`SubspaceTracker.settle`), and a record whose basis turned out to
    keep too little of its activation is re-projected (or made dense) before any backward
    reads it. Everything that counted the record (`StorageStats.add_packed`) follows.

    Attributes:
        coeffs: ``(N, k)`` coefficients ``C = (X - 1 mᵀ) Q`` (None when stored dense).
        dense: the activation itself, detached (None when stored low-rank).
        basis: the ``(width, k)`` fp32 basis version ``Q`` the coefficients belong to.
        mean: the ``(width,)`` row mean ``m`` taken out before projecting (None: not centered).
        shape: original shape of the activation.
        dtype: original dtype of the activation.
    """

    __slots__ = ("__weakref__", "accounts", "basis", "coeffs", "dense", "dtype", "mean", "shape")

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
        self.accounts: list[StorageStats] = []

    @property
    def is_dense(self) -> bool:
        """Whether the activation is stored as it is (exactly)."""
        return self.dense is not None

    @property
    def nbytes(self) -> int:
        """Bytes of what this record stores, basis excluded (it is shared between records)."""
        if self.dense is not None:
            return nbytes(self.dense)
        return nbytes(self.coeffs) + (0 if self.mean is None else nbytes(self.mean))

    def revise(self, *, coeffs: Tensor | None = None, basis: Tensor | None = None,
               mean: Tensor | None = None, dense: Tensor | None = None) -> None:
        """Replace what the record stores (low-rank ``coeffs``/``basis``/``mean``, or ``dense``)."""
        before = self.nbytes
        old_basis = None if self.is_dense else self.basis
        self.coeffs, self.basis, self.mean, self.dense = coeffs, basis, mean, dense
        for stats in self.accounts:
            stats.revised(self, before, old_basis)

    def __repr__(self) -> str:
        how = "dense" if self.is_dense else f"rank={self.coeffs.shape[1]}"
        return f"Packed(shape={tuple(self.shape)}, dtype={self.dtype}, {how}, nbytes={self.nbytes})"


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
    # Distinct basis versions referenced by the packs, by identity, with how many packs refer
    # to each; kept alive while the stats object lives so that ids are not reused.
    _bases: dict[int, Any] = field(default_factory=dict, repr=False)
    _refs: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def basis_bytes(self) -> int:
        """Bytes of the distinct basis storages the packs refer to (a basis shrunk to a
        prefix of its columns is a view of the same storage)."""
        return sum(b.untyped_storage().nbytes() if isinstance(b, Tensor) else nbytes(b)
                   for b in self._bases.values())

    @property
    def total_stored_bytes(self) -> int:
        """Everything kept: packs, their bases, and the tensors kept as they are."""
        return self.stored_bytes + self.basis_bytes + self.passthrough_bytes

    def _ref_basis(self, basis: Any, delta: int) -> None:
        if basis is None:
            return
        key = basis.untyped_storage().data_ptr() if isinstance(basis, Tensor) else id(basis)
        self._bases.setdefault(key, basis)
        self._refs[key] = self._refs.get(key, 0) + delta
        if self._refs[key] <= 0:
            del self._bases[key], self._refs[key]

    def add_packed(self, dense: Tensor, packed: Any) -> None:
        """Record that `dense` was stored as `packed`."""
        self.seen_bytes += nbytes(dense)
        self.dense_bytes += nbytes(dense)
        self.stored_bytes += nbytes(packed)
        self.packed += 1
        if isinstance(packed, Packed):
            packed.accounts.append(self)
            if not packed.is_dense:
                self._ref_basis(packed.basis, 1)

    def revised(self, packed: Packed, before: int, old_basis: Any) -> None:
        """`Packed.revise` changed what ``packed`` stores (it was ``before`` bytes)."""
        self.stored_bytes += packed.nbytes - before
        self._ref_basis(old_basis, -1)
        if not packed.is_dense:
            self._ref_basis(packed.basis, 1)

    def add_passthrough(self, t: Tensor) -> None:
        """Record a saved tensor kept as it is (parameters are not activations: skipped)."""
        if is_weight(t):
            return
        self.seen_bytes += nbytes(t)
        self.passthrough_bytes += nbytes(t)

    def to_dict(self) -> dict[str, int]:
        """Plain-dict view (for reports)."""
        keys = ("uncompressed_bytes", "seen_bytes", "dense_bytes", "stored_bytes",
                "passthrough_bytes", "packed", "deduped", "calls")
        out = {k: getattr(self, k) for k in keys}
        out.update(basis_bytes=self.basis_bytes, total_stored_bytes=self.total_stored_bytes)
        return out
