"""`laser_fx._linalg`: Gram-matrix factorizations agree with SVDs of the data."""

from __future__ import annotations

import struct

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laser_fx._linalg import as_fp32, gram_basis, ritz, skinny, subspace_iteration

SHAPES = st.tuples(st.integers(1, 80), st.integers(1, 40))
SEED = st.integers(0, 2**31 - 1)


def data(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Rows with a decaying spectrum (what activations look like), fp32."""
    g = torch.Generator().manual_seed(seed)
    r = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, r, generator=g)).Q
    v = torch.linalg.qr(torch.randn(cols, r, generator=g)).Q
    return (u * torch.logspace(0, -3, r)) @ v.T


@settings(deadline=None, max_examples=60)
@given(SHAPES, SEED)
def test_gram_basis_energies_and_directions_match_the_svd(shape, seed):
    x = data(*shape, seed)
    energies, vecs = gram_basis(x)
    s = torch.linalg.svdvals(x.double())
    k = s.numel()
    torch.testing.assert_close(energies[:k], s.square(), rtol=1e-5, atol=1e-9)
    assert torch.all(energies[:-1] >= energies[1:])  # descending
    eye = torch.eye(vecs.shape[1], dtype=vecs.dtype)
    torch.testing.assert_close(vecs.T @ vecs, eye, rtol=0, atol=1e-5)
    # the leading direction keeps the largest energy, as the top right singular vector does
    assert float((x @ vecs[:, 0]).square().sum()) >= float(s[0].square()) * (1 - 1e-4)


@settings(deadline=None, max_examples=60)
@given(SHAPES, st.integers(1, 12), SEED)
def test_ritz_is_the_best_rotation_inside_the_span(shape, k, seed):
    rows, cols = shape
    x = data(rows, cols, seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.linalg.qr(torch.randn(cols, min(k, cols), generator=g)).Q
    energies, basis, coeffs = ritz(x, q)
    # same span, orthonormal, coefficients are the projection, energies sorted and exact
    torch.testing.assert_close(basis @ basis.T, q @ q.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(coeffs, x @ basis, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(energies, coeffs.double().square().sum(0), rtol=1e-4, atol=1e-8)
    assert torch.all(energies[:-1] >= energies[1:])
    # and the top Ritz value is the SVD's of X Q: nothing inside the span keeps more
    top = torch.linalg.svdvals((x @ q).double())[0].square()
    torch.testing.assert_close(energies[0], top, rtol=1e-4, atol=1e-9)


@settings(deadline=None, max_examples=30)
@given(st.integers(20, 80), st.integers(8, 40), st.integers(1, 4), SEED)
def test_subspace_iteration_finds_an_exactly_low_rank_span(rows, cols, rank, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    q = subspace_iteration(x, torch.randn(cols, rank + 2, generator=g), 2)
    kept = float((x @ q).square().sum() / x.square().sum())
    assert kept >= 1 - 1e-5


@settings(deadline=None, max_examples=40)
@given(st.integers(8, 80), st.integers(4, 40), st.integers(1, 6), st.integers(1, 3), SEED)
def test_subspace_iteration_from_a_known_product_spans_what_the_plain_one_spans(
        rows, cols, k, iters, seed):
    # the tracker's warm start hands in X @ [Q, R] (the call's coefficients and fresh
    # columns) instead of [Q, R]: the span after the iterations must be the same
    x = data(rows, cols, seed)
    g = torch.Generator().manual_seed(seed + 1)
    k = min(k, cols, rows)
    q0 = torch.linalg.qr(torch.randn(cols, k, generator=g)).Q
    start = torch.cat([q0[:, : max(k - 1, 1)], torch.randn(cols, k - max(k - 1, 1), generator=g)], 1)
    plain = subspace_iteration(x.double(), start.double(), iters)
    known = subspace_iteration(x.double(), start.double(), iters, x.double() @ start.double())
    assert known.shape == plain.shape
    torch.testing.assert_close(known.T @ known, torch.eye(known.shape[1], dtype=known.dtype),
                               rtol=0, atol=1e-8)
    # same captured energy (the spans agree where X has energy)
    e_plain = float((x.double() @ plain).square().sum())
    e_known = float((x.double() @ known).square().sum())
    assert abs(e_plain - e_known) <= 1e-8 * max(float(x.double().square().sum()), 1e-30)


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 300), st.integers(1, 64), st.integers(1, 40), st.booleans(), SEED)
def test_skinny_is_the_product_in_a_transposed_dense_buffer(rows, inner, k, a_transposed, seed):
    g = torch.Generator().manual_seed(seed)
    # the tracker hands in row-major activations and, for Xᵀ C, their transposed view
    a = (torch.randn(inner, rows, generator=g).T if a_transposed
         else torch.randn(rows, inner, generator=g))
    b = torch.randn(inner, k, generator=g)
    out = skinny(a, b)
    assert out.shape == (rows, k)
    torch.testing.assert_close(out.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-5)
    # the k x rows buffer the faster GEMM wrote, seen transposed (not a copy)
    assert out.T.is_contiguous()
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()


@given(st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e30,
                 max_value=1e30))
def test_as_fp32_is_what_an_fp32_buffer_holds(v):
    assert as_fp32(v) == float(torch.tensor(v, dtype=torch.float32))
    assert as_fp32(as_fp32(v)) == as_fp32(v)
    assert struct.pack("f", as_fp32(v)) == struct.pack("f", v)
