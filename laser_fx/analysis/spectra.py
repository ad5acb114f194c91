"""Spectral statistics of activation matrices: energy ranks, participation ratio, subspaces.

All functions take float64 tensors (the caller converts): the energies of a 99%-rank
decision and principal angles of ~1e-4 rad are below float32's resolution on ill-conditioned
activations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "effective_rank",
    "participation_ratio",
    "principal_angles",
    "rank_k_energy",
    "singular_values",
    "subspace_energy",
    "top_basis",
]

#: relative slack on an energy threshold, so that a rank whose cumulative energy equals the
#: threshold up to rounding counts as reaching it
_SLACK = 1e-12


def singular_values(x: Tensor) -> Tensor:
    """Singular values of ``x`` (tokens, width), descending, float64."""
    return torch.linalg.svdvals(x.double())


def effective_rank(s: Tensor, energy: float) -> int:
    """Smallest k whose top-k singular values keep ``energy`` of the total squared norm.

    Args:
        s: singular values, descending.
        energy: fraction in (0, 1].

    Returns:
        k in [1, len(s)]; 0 for an all-zero matrix.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"`energy` must be in (0, 1], got {energy}.")
    e = s.double().square()
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0) / total
    hits = torch.nonzero(cum >= energy - _SLACK)
    return int(hits[0]) + 1 if hits.numel() else int(e.numel())


def participation_ratio(s: Tensor) -> float:
    """``(Σλ)² / Σλ²`` with ``λ = s²``: 1 for rank one, the rank for a flat spectrum.

    Returns:
        A value in [1, number of nonzero singular values]; 0 for an all-zero matrix.
    """
    e = s.double().square()
    denom = float(e.square().sum())
    if denom == 0.0:
        return 0.0
    return float(e.sum()) ** 2 / denom


def rank_k_energy(s: Tensor, ks: list[int]) -> list[float]:
    """Energy fraction kept by the best rank-k linear subspace, for each k (Eckart-Young).

    k beyond the number of singular values keeps everything (1.0).
    """
    e = s.double().square()
    total = float(e.sum())
    cum = torch.cumsum(e, 0)
    out = []
    for k in ks:
        if total == 0.0:
            out.append(1.0)
        else:
            out.append(min(1.0, float(cum[min(k, e.numel()) - 1]) / total) if k > 0 else 0.0)
    return out


def top_basis(x: Tensor, k: int) -> Tensor:
    """Orthonormal (width, k) basis of the top-k right singular subspace of ``x``."""
    _, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return vh[:k].T.contiguous()


def subspace_energy(x: Tensor, q: Tensor) -> float:
    """Fraction of ``x``'s energy inside span(q) (``q`` orthonormal columns)."""
    total = float(x.double().square().sum())
    if total == 0.0:
        return 1.0
    return min(1.0, float((x.double() @ q.double()).square().sum()) / total)


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between span(a) and span(b).

    Both are orthonormal (width, k) bases of the same k. Small angles come from the sines
    (the singular values of ``b - a aᵀ b``), large ones from the cosines: ``arccos`` alone
    loses half the digits near 0 (an angle of 1e-8 would read as ~1e-8 ± 1e-8).

    Returns:
        k angles in [0, π/2], ascending.
    """
    if a.shape != b.shape:
        raise ValueError(f"bases must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    a, b = a.double(), b.double()
    cos = torch.linalg.svdvals(a.T @ b).clamp(0.0, 1.0)  # descending: angles ascending
    sin = torch.linalg.svdvals(b - a @ (a.T @ b)).clamp(0.0, 1.0).flip(0)  # ascending
    by_cos = torch.arccos(cos)
    by_sin = torch.arcsin(sin)
    small = by_sin < math.pi / 4
    return torch.where(small, by_sin, by_cos)
