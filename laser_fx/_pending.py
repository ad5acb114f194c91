"""What a `SubspaceTracker` leaves open for its next call: the decision about the last
call (`PendingCall`) and the second half of a refinement (`PendingRitz`).

Both hold values the device computed and the host needs (captured energies; a small Gram
matrix). On an accelerator they are copied to pinned host memory as soon as they are
computed, and read one call later, when the copy is long done: the host never waits for the
device in the steady state, nor for a refinement's power iteration.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._linalg import sym_eig_desc, to_device_async
from .packed import Packed

__all__ = ["PendingCall", "PendingRitz"]


class _HostCopy:
    """``t`` copied to the host: at once on a CPU, asynchronously from an accelerator."""

    __slots__ = ("event", "host")

    def __init__(self, t: Tensor) -> None:
        self.event = None
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            t = host
        self.host = t

    def read(self) -> Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.host


class PendingCall:
    """The last call, until `SubspaceTracker.settle` decides about it: its record, the
    activation, its row mean and fp32 coefficients (what a revision starts from) and the
    energies ``[‖X - 1mᵀ‖², ‖C_1‖², …, ‖C_k‖²]``."""

    __slots__ = ("coeffs", "energies", "mean", "packed", "x")

    def __init__(self, packed: Packed, x: Tensor, mean: Tensor | None, coeffs: Tensor,
                 energies: Tensor) -> None:
        self.packed = packed
        self.x = x
        self.mean = mean
        self.coeffs = coeffs  # the record's own tensor when it is stored in fp32
        self.energies = _HostCopy(energies)

    def read(self) -> list[float]:
        return self.energies.read().tolist()


class PendingRitz:
    """A refinement whose power iteration ran (the record already stored in its ``q``) and
    whose Ritz step waits for the ``q``-Gram matrix ``CᵀC`` of the coefficients ``C = X q``.

    ``x`` / ``mean`` / ``total``: the activation, its row mean and centered energy (a reset
    starts from them when the refined basis keeps too little); ``rank``: the basis's rank
    before (what a fixed-rank tracker keeps)."""

    __slots__ = ("c", "gram", "mean", "packed", "q", "rank", "total", "x")

    def __init__(self, packed: Packed, x: Tensor, mean: Tensor | None, total: float, q: Tensor,
                 c: Tensor, gram: Tensor, rank: int) -> None:
        self.packed = packed
        self.rank = rank  # the basis's rank before the refinement
        self.x = x
        self.mean = mean
        self.total = total
        self.q = q
        self.c = c
        self.gram = _HostCopy(gram)

    def read(self) -> tuple[Tensor, Tensor]:
        """Ritz values (host, fp64, descending) and the eigenvectors (on ``q``'s device)."""
        vals, vecs = sym_eig_desc(self.gram.read())
        return vals, to_device_async(vecs, self.q.device)
