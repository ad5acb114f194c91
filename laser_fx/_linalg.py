"""The small factorizations a `SubspaceTracker` is built from.

Everything that decides a basis works on small Gram matrices (``k x k`` for a refinement,
``width x width`` for an exact reset): an eigendecomposition of ``CᵀC`` gives the same
directions and energies as an SVD of the tall ``N x k`` matrix ``C`` at a fraction of the
cost, and the tracker never factorizes a whole ``N x width`` activation.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["as_fp32", "gram_basis", "orthonormal", "ritz", "ritz_gram", "ritz_rotate",
           "single_thread_if_small", "skinny", "subspace_iteration", "sym_eig_desc",
           "to_device_async"]

#: Gram matrices up to this order are decomposed on the host when they live on an accelerator
_HOST_EIG_MAX = 128

#: CPU problems up to this many elements run their factorizations on one thread (see below).
_SMALL_CPU = 1 << 18


@contextlib.contextmanager
def single_thread_if_small(x: Tensor) -> Iterator[None]:
    """Run small CPU factorizations on one thread.

    A QR or eigendecomposition of a few-thousand-element matrix gains nothing from threads,
    but it runs many short parallel regions; on an oversubscribed CPU each can stall on a
    descheduled thread (measured: 0.3-1.4 s instead of 0.1 ms per update on a loaded 2-core
    machine).
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


def skinny(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for a tall, narrow result (``N x k``, k small), as the view ``(bᵀ aᵀ)ᵀ``.

    The tracker's products all have few columns (``X Q``, ``C V``, ``Xᵀ C``). Single-threaded
    MKL writes a ``k x N`` product several times faster than the same ``N x k`` one when k is
    not a multiple of 16 (``benchmarks/tracker_cost.py --layouts``); the result is a transposed
    view of a dense buffer, which every consumer (matmul, reductions, ``.to``) takes as is.
    """
    return (b.T @ a.T).T


def orthonormal(m: Tensor) -> Tensor:
    """An orthonormal basis of the columns of ``m`` (reduced QR)."""
    return torch.linalg.qr(m, mode="reduced").Q


def subspace_iteration(x: Tensor, start: Tensor, iters: int, x_start: Tensor | None = None
                       ) -> Tensor:
    """Orthonormal basis of ``(XᵀX)^iters · start``; matrix-free (never forms XᵀX).

    ``x_start``: ``X @ start`` when the caller has it (a warm start's ``X Q`` is the call's
    coefficients); the first iteration then starts from it, without orthonormalizing
    ``start`` first (the span is the same; the QR after the iteration restores the scale).
    """
    if x_start is not None and iters > 0:
        q = orthonormal(skinny(x.T, x_start))
        iters -= 1
    else:
        q = orthonormal(start)
    for _ in range(iters):
        q = orthonormal(skinny(x.T, skinny(x, q)))
    return q


def _gram(a: Tensor) -> Tensor:
    """``aᵀa`` in fp64: squaring the data squares its rounding, and fp32 would blur the
    energies of an exactly low-rank activation's null directions to ~1e-7 of the largest."""
    a = a.double()
    return a.T @ a


def sym_eig_desc(g: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric fp64 ``g``.

    On an accelerator a small ``g`` (up to `_HOST_EIG_MAX`) is decomposed on the host: the
    device's solver checks its result on the host anyway (a synchronisation), and the tracker
    reads the energies right after (several more); one copy of ``g`` is the only wait, the
    energies come back on the host, the eigenvectors go back asynchronously, and a 64 x 64
    problem takes less than half the time of an H200's solver."""
    if g.device.type != "cpu" and g.shape[0] <= _HOST_EIG_MAX:
        vals, vecs = sym_eig_desc(g.cpu())
        return vals, to_device_async(vecs, g.device)
    vals, vecs = torch.linalg.eigh(g)
    return vals.flip(0).clamp_min(0.0), vecs.flip(1)


def to_device_async(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``; on a CUDA device copied from pinned memory without
    waiting (the caching host allocator keeps the pinned buffer until the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def ritz_gram(x: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """The first half of `ritz`: ``C = X Q`` and its fp64 Gram matrix ``CᵀC``."""
    c = skinny(x, q)
    return c, _gram(c)


def ritz_rotate(q: Tensor, c: Tensor, vecs: Tensor) -> tuple[Tensor, Tensor]:
    """The second half of `ritz`: ``(Q V, C V)`` for the eigenvectors ``V`` of ``CᵀC``."""
    v = vecs.to(q.dtype)
    return q @ v, skinny(c, v)


def ritz(x: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Best directions of ``x`` inside span(q), sorted by captured energy.

    ``C = X Q`` and the ``k x k`` eigendecomposition ``CᵀC = V Λ Vᵀ``: the directions are
    ``Q V``, their energies ``Λ`` and their coefficients ``C V``.

    Returns:
        (energies fp64 descending, on the host when ``q`` has at most `_HOST_EIG_MAX`
        columns; basis ``Q V``; coefficients ``X Q V``).
    """
    c, gram = ritz_gram(x, q)
    vals, vecs = sym_eig_desc(gram)
    return (vals, *ritz_rotate(q, c, vecs))


def gram_basis(x: Tensor) -> tuple[Tensor, Tensor]:
    """Every direction of ``x`` (``N x width``) from its ``width x width`` Gram matrix.

    Returns:
        (energies fp64 descending, ``width x width`` orthonormal directions in x's dtype).
    """
    vals, vecs = sym_eig_desc(_gram(x))
    return vals, vecs.to(x.dtype)


def as_fp32(v: float) -> float:
    """``v`` rounded as an fp32 buffer holds it: a host copy and the saved state agree."""
    return struct.unpack("f", struct.pack("f", v))[0]
