"""What the tracker tests share: synthetic low-rank activations, the share of energy a record
keeps, and a counter of host reads."""

from __future__ import annotations

import contextlib

import torch

READS = ("item", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def count_reads():
    """Counts calls of the Tensor methods that read a value back to the host, plus `tolist`
    (how the tracker reads the previous call's energies, one call late)."""
    counts = dict.fromkeys((*READS, "tolist"), 0)
    saved = {name: getattr(torch.Tensor, name) for name in counts}

    def wrap(name):
        def read(self, *a, **k):
            counts[name] += 1
            return saved[name](self, *a, **k)
        return read

    for name in counts:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def low_rank(n: int, width: int, rank: int, sub: int, seed: int) -> torch.Tensor:
    """``n`` rows of rank ``rank`` in subspace ``sub`` (fixed per ``sub`` and ``width``), with
    energies decaying tenfold across it; ``seed`` draws the coefficients."""
    g = torch.Generator().manual_seed(1000 * sub + width)
    v = torch.linalg.qr(torch.randn(width, width, generator=g)).Q[:, :rank]
    g.manual_seed(seed)
    return (torch.randn(n, rank, generator=g) * torch.logspace(0, -1, rank)) @ v.T


def captured(x: torch.Tensor, packed) -> float:
    """Energy share of ``x``'s centered rows a record keeps (1 for a dense record)."""
    if packed.is_dense:
        return 1.0
    xc = x.reshape(-1, x.shape[-1]).float()
    xc = xc - xc.mean(0)
    return float(packed.coeffs.float().square().sum() / xc.square().sum())

