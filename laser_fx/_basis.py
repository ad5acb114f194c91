"""How a `SubspaceTracker` builds and refines its basis (the slow paths).

A refinement is warm-started block subspace iteration on ``[Q, random]`` with Ritz values
from the small Gram matrix; a reset takes the leading directions of the ``width x width``
Gram matrix (of the ``rows x rows`` one when there are fewer rows), or, above width
`_EXACT_MAX`, of randomized subspace iteration. New bases keep `build_target` of the
activation's energy, or the fixed rank; ranks follow the data both ways (`_shrink`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._linalg import (
    as_fp32,
    gram_basis,
    ritz,
    ritz_gram,
    ritz_rotate,
    skinny,
    subspace_iteration,
    sym_eig_desc,
)
from .config import LaserConfig

__all__ = ["BasisUpdates"]

#: widths up to this are reset exactly, from the width x width Gram matrix
_EXACT_MAX = 256
#: energy fraction treated as rounding noise, so that ``energy=1.0`` on exactly low-rank data
#: keeps its rank instead of every numerically-zero direction.
_TAIL_FLOOR = 1e-10
#: subspace iterations of a randomized reset (the usual niter=2 of randomized SVD).
_RESET_ITERS = 2
_SEED = 0x1A5E2


class BasisUpdates:
    """The basis-building half of `SubspaceTracker` (a mixin: it reads the tracker's
    ``width``, ``config``, ``basis`` and counters, and its `threshold` / `build_target`)."""

    width: int
    config: LaserConfig
    basis: Tensor
    calls: int
    resets: int
    power_updates: int
    shrinks: int
    rank: Tensor
    reset_fidelity: Tensor
    _reset_fid: float

    def _cap(self) -> int:
        return min(self.width, self.config.max_rank or self.width)

    def _generator(self, device: torch.device) -> torch.Generator:
        # A private, seeded generator: the tracker must not consume the global RNG stream,
        # or a compressed model would draw different dropout masks than the original.
        gen = torch.Generator(device=device)
        gen.manual_seed(_SEED + self.calls)
        return gen

    def _random(self, rows: int, cols: int, like: Tensor) -> Tensor:
        gen = self._generator(like.device)
        return torch.randn(rows, cols, generator=gen, device=like.device, dtype=like.dtype)

    def _refine(self, xc: Tensor, total: float, coeffs: Tensor | None = None
                ) -> tuple[Tensor, Tensor, float]:
        """A basis keeping at least the trigger's share of ``xc``: power update, else reset.
        ``coeffs``: ``xc @ basis`` when the caller has it (the call's projection)."""
        if self._can_power_update():
            self.power_updates += 1
            got = self._power_update(xc, total, coeffs)
            if got is not None:
                return got
        return self._reset(xc, total)

    def _can_power_update(self) -> bool:
        """Whether a refinement starts with a power update (a basis to warm-start from)."""
        return self.config.power_iters > 0 and 0 < self.basis.shape[1] < self.width

    def _power_update(self, xc: Tensor, total: float, coeffs: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, float] | None:
        """Warm-started block subspace iteration on ``[Q, random]``; None if not enough.
        With ``coeffs`` (``xc @ Q``), only the random columns are multiplied by ``xc``."""
        k = self.basis.shape[1]
        q, c, gram = self._power_start(xc, coeffs)
        return self._power_finish(q, c, *sym_eig_desc(gram), total, k)

    def _power_start(self, xc: Tensor, coeffs: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """The device half of `_power_update`: the iterated ``q``, ``C = X q`` and ``CᵀC``."""
        k = self.basis.shape[1]
        extra = min(self.config.oversample, self.width - k)
        start, x_start = self.basis, coeffs
        if extra > 0:
            rand = self._random(self.width, extra, xc)
            start = torch.cat([self.basis, rand], dim=1)
            if coeffs is not None:
                x_start = torch.cat([coeffs.T, skinny(xc, rand).T]).T  # k x N buffers
        q = subspace_iteration(xc, start, self.config.power_iters, x_start)
        return (q, *ritz_gram(xc, q))

    def _power_finish(self, q: Tensor, c: Tensor, energies: Tensor, vecs: Tensor,
                      total: float, k: int) -> tuple[Tensor, Tensor, float] | None:
        """The decision half of `_power_update` from the Ritz values and vectors of
        ``CᵀC`` (``k``: the rank before); None if the refined basis keeps too little."""
        if self.config.rank is None:
            # energy mode: the rank follows the data both ways; the extra columns' energies
            # are exact for the directions they span, so a few more directions are taken
            # instead of a reset, and directions no longer needed are dropped
            keep = self._pick_prefix(energies, total, self.build_target())
            if keep is None:
                keep = q.shape[1]
        else:
            keep = k
        fid = min(1.0, float(energies[:keep].sum()) / total)
        if fid < self.threshold():
            return None
        return (*ritz_rotate(q, c, vecs[:, :keep]), fid)

    def _reset(self, xc: Tensor, total: float) -> tuple[Tensor, Tensor, float]:
        """Rebuild the basis: smallest k keeping the build target, or the
        fixed rank. Exact from the Gram matrix up to width `_EXACT_MAX`, randomized above."""
        self.resets += 1
        n, d = xc.shape
        fixed = self.config.target_rank(d)
        target = self.build_target()
        p = self.config.oversample
        q = (fixed if fixed is not None else max(2 * self.basis.shape[1], 16)) + p
        basis = None
        while d > _EXACT_MAX and 2 * q <= min(n, d):
            start = self.basis[:, : min(self.basis.shape[1], q)]
            start = torch.cat([start, self._random(d, q - start.shape[1], xc)], dim=1)
            energies, cand, _ = ritz(xc, subspace_iteration(xc, start, _RESET_ITERS))
            # only the leading q - p Ritz values are reliable after two iterations
            k = fixed if fixed is not None else self._pick_prefix(energies[: q - p], total, target)
            if k is None and self._cap() <= q - p:
                k = self._cap()  # max_rank reached: more columns cannot help
            if k is not None:
                basis = cand[:, :k]
                break
            q *= 2
        if basis is None:
            basis = self._exact(xc, fixed, target)
        coeffs = skinny(xc, basis)
        fid = min(1.0, float(coeffs.square().sum()) / total)
        self._reset_fid = as_fp32(fid)
        self.reset_fidelity.fill_(fid)
        return basis, coeffs, fid

    def _exact(self, xc: Tensor, fixed: int | None, target: float) -> Tensor:
        """Leading directions from the smaller Gram matrix (features ``XᵀX`` or rows ``XXᵀ``)."""
        n, d = xc.shape
        if d <= n:
            energies, vecs = gram_basis(xc)
        else:  # few rows: the directions are Xᵀ u / σ for the row Gram's eigenpairs
            energies, u = gram_basis(xc.T)
            keep = int((energies > energies[0] * 1e-12).sum()) if energies[0] > 0 else 1
            vecs = torch.linalg.qr(xc.T @ u[:, :keep], mode="reduced").Q
            energies = energies[:keep]
        if fixed is not None:
            k = fixed
        else:
            budget = (1.0 - target + _TAIL_FLOOR) * float(energies.sum())
            tail = energies.sum() - torch.cumsum(energies, 0)  # tail[k-1]: dropped keeping k
            k = min(self._cap(), int(torch.nonzero(tail <= budget)[0]) + 1)
        return vecs[:, : min(k, vecs.shape[1])]

    def _pick_prefix(self, energies: Tensor, total: float, target: float) -> int | None:
        """Smallest k whose leading energies reach ``target * total``."""
        need = min(target, 1.0 - _TAIL_FLOOR) * total
        hits = torch.nonzero(torch.cumsum(energies, 0) >= need)
        if hits.numel() == 0:
            return None
        return min(self._cap(), int(hits[0]) + 1, energies.numel())

    def _shrink(self, energies: list[float], total: float) -> None:
        """Drop trailing columns the last activation did not need (energy mode only)."""
        k = len(energies)
        if self.config.rank is not None or k <= 1 or total <= 0.0:
            return
        need, acc, keep = min(self.build_target(), 1.0 - _TAIL_FLOOR) * total, 0.0, k
        for i, e in enumerate(energies):  # columns are ordered by energy (Ritz/Gram order)
            acc += e
            if acc >= need:
                keep = min(self._cap(), i + 1)
                break
        if keep < k:  # a view: its storage is pinned by the records made with it anyway
            self.shrinks += 1
            self.basis = self.basis[:, :keep]
            self.rank.fill_(keep)
