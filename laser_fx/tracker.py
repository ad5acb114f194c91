"""`SubspaceTracker`: the low-rank basis one site's activations are stored in.

A call projects the activation onto the current basis Q (``C = (X - m) Q``) and returns the
record at once. Whether Q kept enough of X's energy is decided **one call late**
(`SubspaceTracker.settle`, run by the next call, by the end of the model's forward, or by
the record's first `decompress`): the call only queues the captured energies (a small device
tensor, copied to the host asynchronously on a GPU), so the steady state never stalls on a
device-to-host read. When the energy kept falls short, the record is revised before any
backward reads it: warm-started block subspace iteration refines Q (Ritz values from the
``k x k`` Gram matrix), and if that is not enough the basis is rebuilt from the
``width x width`` Gram matrix (randomized subspace iteration for wide sites); the
activation is re-projected, so every stored record keeps at least the trigger's share.
On an accelerator a refinement is split in two as well: its power iteration runs on the
device and the record is stored in the iterated basis at once; the Ritz step (the small
Gram matrix, copied asynchronously) is taken by the next call, which then rotates and
truncates that record (`laser_fx._decisions`). So neither a decision nor a refinement
waits for the device during the forward. At its end the forward's last calls are decided,
every tracker queues its refinement (`end_forward`), and only then does the host wait for
their copies (events, not synchronising reads) to take their Ritz steps. A reset (rare), a
tracker's first call, a fixed-rank tracker's refinement and one of a site whose oversampled
basis would pass half its width read values back at once.

Slow paths stay rare by construction: a basis is built to keep half of what the trigger
allows to be dropped (``energy`` 0.999 builds at 0.9995), so the next, slightly different
activation still clears the trigger; and calls from different call sites have their own
trackers (`laser_fx.wrapper.TrackerStore.tracker`). Every basis change assigns a NEW tensor
to ``basis`` (or a prefix view of it), so each record keeps the basis version it was
projected with. How bases are built and refined: `laser_fx._basis`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._basis import BasisUpdates
from ._decisions import LateDecisions, PendingCall, PendingRitz, defers, no_autocast
from ._linalg import as_fp32, single_thread_if_small, skinny
from .config import LaserConfig
from .errors import ConfigError
from .packed import Packed, nbytes

__all__ = ["SubspaceTracker"]

#: a basis is built to drop at most this share of what the trigger allows to be dropped
#: (hysteresis between the build target and the refine trigger)
_HYSTERESIS = 0.5
#: in energy mode, coefficients above this fraction of the dense bytes are not worth the
#: tracking: store dense and skip the next `_BACKOFF` calls (high-rank activations, e.g. at
#: random init, would otherwise pay a basis update on every call for a small saving). Each
#: further incompressible try in a row doubles the skip, up to `_BACKOFF_MAX` calls, so a
#: site that stays high-rank costs a reset every few hundred calls, not every eighth.
_INCOMPRESSIBLE = 0.75
_BACKOFF = 8
_BACKOFF_MAX = 256
_COUNTERS = ("calls", "resets", "power_updates", "shrinks", "nonfinite", "dense_stores",
             "revisions")
#: plain Python state a call updates (never a parameter, buffer or submodule): set directly,
#: past ``nn.Module.__setattr__``'s checks, which cost more than a steady-state projection
_PLAIN = frozenset((*_COUNTERS, "stored_bytes", "dense_bytes", "backoff", "backoff_next",
                    "_pending", "_ritz", "_reset_fid", "_min_fid", "_last_fid"))


def _compact(t: Tensor, *, transposed: bool = False) -> Tensor:
    """``t`` in its own storage, so that a kept slice does not pin a larger buffer alive;
    ``transposed``: a matrix kept as the transpose of a dense buffer, the layout coefficients
    are computed in (`skinny`)."""
    own = t.T if transposed else t
    if own.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    own = own.clone(memory_format=torch.contiguous_format)
    return own.T if transposed else own


class SubspaceTracker(LateDecisions, BasisUpdates, nn.Module):
    """Tracked low-rank basis of one site's activations (last dim = ``width``).

    ``state_dict`` holds the basis and fidelities (``load_state_dict`` also takes a tracker
    of another rank; ``.to()``, ``deepcopy`` and ``torch.load(weights_only=True)`` work).
    Counters are plain Python numbers (`stats`); ``stored_bytes``/``dense_bytes`` cover the
    calls since `begin_step`, ``stored_bytes`` counting records, not basis versions.

    Args:
        width: size of the last dim of every activation this tracker compresses.
        config: the site's `LaserConfig` (energy or fixed rank, fidelity, power_iters, ...).

    Example::

        tracker = SubspaceTracker(64, LaserConfig(energy=0.99))
        packed = tracker.compress(x)          # x: (..., 64)
        x_hat = tracker.decompress(packed)    # decides about the call first, if still open
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
        self.register_buffer("last_fidelity", torch.ones(()))
        self.register_buffer("min_fidelity", torch.ones(()))
        # captured energy right after the last reset (the fixed-rank trigger is relative to it)
        self.register_buffer("reset_fidelity", torch.ones(()))
        self._reset_fid = 1.0  # host copies: read on every decision, never from the device
        self._min_fid = self._last_fid = 1.0
        for name in (*_COUNTERS, "stored_bytes", "dense_bytes"):
            setattr(self, name, 0)
        self.backoff = 0  # calls left to store dense without trying
        self.backoff_next = _BACKOFF  # the next back-off's length (doubles while tries fail)
        self._pending: PendingCall | None = None
        self._ritz: PendingRitz | None = None  # a refinement's Ritz step, left to the next call

    def extra_repr(self) -> str:
        return f"width={self.width}, rank={self.basis.shape[1]}"

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PLAIN:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ public API
    def begin_step(self) -> None:
        """Decide about the last call, then zero the byte counters (once per training step)."""
        self.settle()
        self.stored_bytes = self.dense_bytes = 0

    @torch.no_grad()
    @no_autocast
    def end_forward(self) -> None:
        """Decide about the last call without waiting for the device: as `settle` on a CPU;
        on an accelerator a refinement this decision starts only queues its power iteration
        (and the copy of its small Gram matrix), leaving its Ritz step to `settle`. The end
        of the model's forward runs this on every tracker, then `settle` on every tracker:
        the host waits for the refinements' copies after all of them are queued, not once
        per refining tracker between them."""
        self._advance(defer=defers(self.basis))

    def stats(self) -> dict[str, int | float]:
        """Current rank, counters, fidelities and byte counts as plain Python numbers."""
        out: dict[str, int | float] = {"rank": int(self.basis.shape[1])}
        for name in (*_COUNTERS, "stored_bytes", "dense_bytes"):
            out[name] = getattr(self, name)
        out["last_fidelity"] = self._last_fid
        out["min_fidelity"] = self._min_fid
        return out

    def threshold(self) -> float:
        """Captured-energy fraction below which the basis is updated (see `LaserConfig`)."""
        if self.config.fidelity is not None:
            return self.config.fidelity
        if self.config.rank is None:
            return self.config.energy
        return min(self.config.energy, 0.98 * self._reset_fid)

    def build_target(self) -> float:
        """Energy fraction a new or refined basis keeps: above the trigger (hysteresis)."""
        if self.config.fidelity is not None:  # the user chose the gap
            return self.config.energy
        return 1.0 - (1.0 - self.config.energy) * _HYSTERESIS

    # torch.compile: the tracker is data-dependent Python (ranks, norms); dynamo would
    # recompile it per width/rank until its limit, then run it eagerly anyway
    @torch.compiler.disable
    @torch.no_grad()
    @no_autocast
    def compress(self, x: Tensor, *, borrowed: bool = False) -> Packed:
        """Store ``x`` (any leading dims, last dim ``width``) in the tracked basis.

        The record is projected on the current basis at once; the decision whether that
        basis kept at least `threshold` of ``x``'s energy is taken at the next `settle`,
        which revises the record if not. Non-finite, tiny (< ``config.min_numel``) or
        incompressible ``x`` is stored dense and leaves the basis untouched.

        Args:
            x: the activation; floating point, on the tracker's device.
            borrowed: ``x``'s buffer may be reused as soon as this returns (an activation
                inside a compiled graph): nothing keeps a reference to it. A record stored
                dense keeps a copy; the decision is taken now on a CPU (no device to wait
                for), and one call late from a copy on an accelerator.

        Returns:
            `Packed` record for `decompress`.
        """
        if borrowed:
            packed = self.compress(x)
            pending = self._pending
            if pending is not None and pending.packed is packed:
                if not defers(x):
                    self.settle()
                else:
                    pending.x = pending.x.clone()
            if packed.is_dense and packed.dense is not None:
                packed.revise(dense=packed.dense.clone())  # same bytes: counters unchanged
            return packed
        self._check(x)
        self._advance(defer=defers(x))
        self.calls += 1
        x = x.detach()
        self.dense_bytes += nbytes(x)
        if x.numel() < self.config.min_numel:
            return self._store_dense(x)
        if self.backoff > 0:
            self.backoff -= 1
            return self._store_dense(x)
        if self.basis.shape[1] == 0:
            xc, mean = self._centered(x)
            return self._first(x, xc, mean)
        coeffs, mean, energies = self._project(x)
        packed = self._store(x, self.basis, coeffs, mean, None, new_basis=False)
        if not packed.is_dense:
            self._pending = PendingCall(packed, x, mean, coeffs, energies)
        return packed

    @no_autocast
    def decompress(self, p: Packed) -> Tensor:
        """Reconstruction ``X̂ = C Qᵀ`` in the original shape and dtype (exact if dense).

        Args:
            p: a record returned by this tracker's `compress`.

        Returns:
            Tensor shaped and typed like the compressed activation.
        """
        p = self.decided(p)
        if p.dense is not None:
            return p.dense
        with torch.no_grad():
            coeffs = p.coeffs.to(p.basis.dtype)
            if p.mean is None:
                x_hat = coeffs @ p.basis.T
            else:
                x_hat = torch.addmm(p.mean.to(coeffs.dtype), coeffs, p.basis.T)
        return x_hat.reshape(p.shape).to(p.dtype)

    # ------------------------------------------------------------------ internals
    def _check(self, x: Tensor) -> None:
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

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Coefficients on the current basis, the row mean, and the energies
        ``[‖X - 1mᵀ‖², ‖C_1‖², …, ‖C_k‖²]``: the steady state's whole cost. (Centering
        explicitly is cheaper on a CPU than a one-pass variance, and ``‖X‖² - N‖m‖²`` loses
        its digits when a shared component dominates, as it does in TRM's carries.)"""
        xc, mean = self._centered(x)
        coeffs = skinny(xc, self.basis)
        total = torch.linalg.vector_norm(xc).square().reshape(1)
        return coeffs, mean, torch.cat([total, coeffs.square().sum(0)])

    def _centered(self, x: Tensor, mean: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``x`` as fp32 rows, less their mean (``mean``: already computed) if centering."""
        xm = x.reshape(-1, self.width).float()
        if not self.config.center:
            return xm, None
        if mean is None:
            mean = xm.mean(0)  # a component shared by every row is kept exactly, aside
        return xm - mean, mean

    def _first(self, x: Tensor, xc: Tensor, mean: Tensor | None) -> Packed:
        """No basis yet: build one now (the warm-up reads values back; later calls do not)."""
        total = float(torch.linalg.vector_norm(xc).square())
        if not math.isfinite(total):
            self.nonfinite += 1
            return self._store_dense(x)
        if total == 0.0:  # nothing to build a basis from: keep it exactly, state untouched
            return self._store_dense(x)
        with single_thread_if_small(xc):
            basis, coeffs, fid = self._reset(xc, total)
        return self._store(x, basis, coeffs, mean, fid, new_basis=True)

    def _note(self, fid: float) -> None:
        """Record a decided call's fidelity (host numbers; the buffers follow when read)."""
        fid = as_fp32(min(1.0, max(0.0, fid)))  # rounding can leave a hair outside [0, 1]
        self._last_fid = fid
        self._min_fid = min(self._min_fid, fid)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self.last_fidelity.fill_(self._last_fid)
        self.min_fidelity.fill_(self._min_fid)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _store(self, x: Tensor, basis: Tensor, coeffs: Tensor, mean: Tensor | None,
               fid: float | None, *, new_basis: bool, into: Packed | None = None,
               provisional: bool = False) -> Packed:
        """Store ``x`` as ``coeffs`` in ``basis`` (adopted if new), or dense when that is not
        worth it; as a new record, or as the revision of ``into``. ``provisional``: a
        refinement's record before its Ritz step, which takes that decision (low-rank now)."""
        if new_basis:
            self.basis = _compact(basis.float())  # assign, never in place: old records keep theirs
            self.rank.fill_(self.basis.shape[1])
        store = self.config.store_dtype or x.dtype
        c = coeffs.to(store)
        m = None if mean is None else mean.to(store)
        x_bytes, rec_bytes = nbytes(x), nbytes(c) + nbytes(m)
        dense = not provisional and rec_bytes >= x_bytes
        if self.config.rank is None and not provisional:
            # energy mode: back off from incompressible activations. A record that brings a
            # new basis version pins it too: with few rows (a small batch of RNN states)
            # coefficients plus basis can outgrow the activation.
            cost = rec_bytes + (nbytes(self.basis) if new_basis else 0)
            dense = cost > _INCOMPRESSIBLE * x_bytes
            if dense:  # forget the basis too: the next try starts cold (a fresh reset)
                self.backoff = self.backoff_next
                self.backoff_next = min(2 * self.backoff_next, _BACKOFF_MAX)
                self.basis = self.basis.new_zeros(self.width, 0)
                self.rank.zero_()
            else:
                self.backoff_next = _BACKOFF
        if dense:
            self._note(1.0)
            return self._store_dense(x, into=into)
        if fid is not None:
            self._note(fid)
        kept = self.basis if new_basis else basis  # adopted: compacted above
        fields = {"coeffs": _compact(c, transposed=True), "basis": kept, "mean": m}
        if into is None:
            packed = Packed(shape=x.shape, dtype=x.dtype, **fields)
            self.stored_bytes += packed.nbytes
            return packed
        self.stored_bytes -= into.nbytes
        into.revise(**fields)
        self.stored_bytes += into.nbytes
        return into

    def _store_dense(self, x: Tensor, into: Packed | None = None) -> Packed:
        self.dense_stores += 1
        if into is None:
            into = Packed(shape=x.shape, dtype=x.dtype, dense=x)
        else:
            self.stored_bytes -= into.nbytes
            into.revise(dense=x)
        self.stored_bytes += into.nbytes
        return into

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
        self._pending = self._ritz = None
        self._reset_fid = float(self.reset_fidelity)
        self._min_fid = float(self.min_fidelity)
        self._last_fid = float(self.last_fidelity)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # a record in flight belongs to the graph it was made in
        state["_pending"] = state["_ritz"] = None
        return state
