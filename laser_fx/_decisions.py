"""How a `SubspaceTracker` decides one call late: what it leaves open for its next call (the
decision about the last call, `PendingCall`; the second half of a refinement,
`PendingRitz`) and the decisions themselves (`LateDecisions`, a mixin of the tracker).

Both hold values the device computed and the host needs (captured energies; a small Gram
matrix). On an accelerator they are copied to pinned host memory as soon as they are
computed, and read one call later, when the copy is long done: the host never waits for the
device in the steady state, nor for a refinement's power iteration.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from ._linalg import single_thread_if_small, sym_eig_desc, to_device_async
from .packed import Packed

__all__ = ["LateDecisions", "PendingCall", "PendingRitz", "defers", "no_autocast"]

#: a refinement leaves its Ritz step to the next call only while its oversampled basis has at
#: most this share of the width's columns: the next call is stored in that basis meanwhile,
#: and must stay well compressible (few-column sites refine at once instead, and so do
#: fixed-rank trackers, whose every record keeps the rank asked for)
_DEFER_SHARE = 0.5


def defers(x: Tensor) -> bool:
    """Whether a refinement of ``x``'s tracker leaves its Ritz step to the next call: on an
    accelerator (a CPU has no device to wait for, and decides at once)."""
    return x.device.type != "cpu"


_F = TypeVar("_F", bound=Callable[..., Any])


def no_autocast(method: _F) -> _F:
    """Run a tracker method with autocast off on the tracker's device: a compress or
    decompress called inside the user's ``torch.autocast`` region would otherwise project and
    reconstruct in bf16/fp16 (records no longer keeping what the decision measured; energy
    1.0 no longer lossless)."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        device = self.basis.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return method(self, *args, **kwargs)
        return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


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


class LateDecisions:
    """The decision half of `SubspaceTracker` (a mixin: it reads the tracker's basis, config,
    counters, open records and its storing and basis-building methods)."""

    basis: Tensor
    width: int
    _pending: PendingCall | None
    _ritz: PendingRitz | None
    revisions: int
    power_updates: int
    nonfinite: int

    @torch.no_grad()
    @no_autocast
    def settle(self) -> None:
        """Take every open decision now (normally taken at the next call).

        Reads the last call's captured energy; when it is below `threshold`, refines the
        basis on that activation and revises its record (and finishes a refinement left
        open by the previous decision). Callers that need every decision taken (the end of
        a forward, a test) call this; `decompress` does it by itself.
        """
        self._advance(defer=False)

    def _advance(self, *, defer: bool) -> None:
        """Finish the open refinement, then decide about the last call; with ``defer``, a
        refinement that decision starts leaves its Ritz step to the next call."""
        ritz, self._ritz = self._ritz, None
        if ritz is not None:
            self._finish(ritz)
        pending, self._pending = self._pending, None
        if pending is not None:
            self._decide(pending, defer)
        if not defer and self._ritz is not None:
            ritz, self._ritz = self._ritz, None
            self._finish(ritz)

    def _decide(self, pending: PendingCall, defer: bool) -> None:
        total, *columns = pending.read()
        captured = sum(columns)
        if not (math.isfinite(total) and math.isfinite(captured)):
            self.nonfinite += 1  # never reaches the basis: keep the activation exactly
            self._store_dense(pending.x, into=pending.packed)
            return
        current = pending.packed.basis is self.basis  # else a refinement replaced it since
        fid = 1.0 if total <= 0.0 else min(1.0, captured / total)
        if fid >= self.threshold():
            self._note(fid)
            if current:
                self._shrink(columns, total)
            return
        self.revisions += 1
        xc, mean = self._centered(pending.x, pending.mean)  # the values the call projected
        coeffs = pending.coeffs if current else None
        k = self.basis.shape[1]
        wide = k + min(self.config.oversample, self.width - k)  # the power iteration's columns
        with single_thread_if_small(xc):
            if (defer and self.config.rank is None and self._can_power_update()
                    and wide <= _DEFER_SHARE * self.width):
                self.power_updates += 1
                q, c, gram = self._power_start(xc, coeffs)
                packed = self._store(pending.x, q, c, mean, None, new_basis=True,
                                     into=pending.packed, provisional=True)
                # (the basis is ``q`` as adopted: compacted)
                self._ritz = PendingRitz(packed, pending.x, mean, total, self.basis, c, gram, k)
                return
            basis, coeffs, fid = self._refine(xc, total, coeffs)
        self._store(pending.x, basis, coeffs, mean, fid, new_basis=True, into=pending.packed)

    def _finish(self, r: PendingRitz) -> None:
        """The Ritz step of a refinement `_decide` started: rotate and truncate its record
        (and the basis, unless something replaced it since), or reset when the refined
        basis keeps too little."""
        vals, vecs = r.read()
        got = self._power_finish(r.q, r.c, vals, vecs, r.total, r.rank)
        adopt = self.basis is r.q
        if got is None:
            xc, _ = self._centered(r.x, r.mean)
            with single_thread_if_small(xc):
                got = self._reset(xc, r.total)
            adopt = True
        basis, coeffs, fid = got
        self._store(r.x, basis, coeffs, r.mean, fid, new_basis=adopt, into=r.packed)

    def decided(self, p: Packed) -> Packed:
        """``p`` after the decision about its call (taken now if still open): what backward
        may read."""
        if ((self._pending is not None and self._pending.packed is p)
                or (self._ritz is not None and self._ritz.packed is p)):
            self.settle()
        return p
