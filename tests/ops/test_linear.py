"""`compressed_linear`: exact forward, exact grad_input / grad_bias, bounded grad_weight error."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from laser_fx.config import LaserConfig
from laser_fx.errors import LaserFxError
from laser_fx.ops import compressed_linear
from laser_fx.tracker import SubspaceTracker


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny factorizations on a shared, oversubscribed 2-core CPU stall on thread barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- strategies (one place)
LEAD = st.lists(st.integers(1, 6), min_size=1, max_size=3)  # leading dims of the input
WIDTH = st.integers(2, 40)
OUT = st.integers(1, 12)
SEED = st.integers(0, 2**31 - 1)
DTYPE = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
EXACT_DTYPE = st.sampled_from([torch.float32, torch.float64])
TOL = {  # (rtol, atol relative to the largest reference entry)
    torch.float32: (1e-4, 1e-4),
    torch.float64: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
}


def cfg(**kw) -> LaserConfig:
    """Test config: compress even the tiny tensors that Hypothesis draws."""
    return LaserConfig(min_numel=0, **kw)


def low_rank(lead: list[int], width: int, rank: int, seed: int, dtype=torch.float32):
    """Input of exact rank <= ``rank`` along the last dim (computed in fp64, then cast)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    a = torch.randn(n, rank, generator=g, dtype=torch.float64)
    b = torch.randn(rank, width, generator=g, dtype=torch.float64)
    return (a @ b).reshape(*lead, width).to(dtype)


def params(width: int, out: int, seed: int, dtype, bias: bool = True):
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(out, width, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = (
        torch.randn(out, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        if bias
        else None
    )
    return w, b


def grads(x, w, b, tracker, seed):
    """Gradients of a fixed random projection of the output, compressed and reference."""
    g = torch.Generator().manual_seed(seed + 2)
    xs = [x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()]
    ws = [w.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()]
    bs = [None, None] if b is None else [b.detach().clone().requires_grad_() for _ in range(2)]
    y_ref = F.linear(xs[0], ws[0], bs[0])
    dy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64).to(x.dtype)
    y_ref.backward(dy)
    y = compressed_linear(xs[1], ws[1], bs[1], tracker)
    y.backward(dy)
    ref = (xs[0].grad, ws[0].grad, None if b is None else bs[0].grad)
    got = (xs[1].grad, ws[1].grad, None if b is None else bs[1].grad)
    return got, ref, dy


def assert_close_rel(got, ref, dtype):
    rtol, atol = TOL[dtype]
    scale = ref.abs().max().item() or 1.0
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol * scale)


# ---------------------------------------------------------------- forward
@given(LEAD, WIDTH, OUT, DTYPE, SEED, st.booleans())
def test_forward_is_bitwise_f_linear(lead, width, out, dtype, seed, bias):
    x = low_rank(lead, width, max(1, width // 3), seed, dtype) + 0.1
    w, b = params(width, out, seed, dtype, bias)
    tracker = SubspaceTracker(width, cfg(rank=2 if width > 2 else 1))
    y = compressed_linear(x, w, b, tracker)
    assert torch.equal(y, F.linear(x, w, b))
    assert int(tracker.calls) == 1


# ---------------------------------------------------------------- backward
@given(LEAD, WIDTH, OUT, DTYPE, SEED, st.integers(1, 40))
def test_energy_one_gives_uncompressed_gradients(lead, width, out, dtype, seed, rank):
    x = low_rank(lead, width, min(rank, width), seed, dtype)
    w, b = params(width, out, seed, dtype)
    (gx, gw, gb), (rx, rw, rb), _ = grads(x, w, b, SubspaceTracker(width, cfg(energy=1.0)), seed)
    for got, ref in ((gx, rx), (gw, rw), (gb, rb)):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert_close_rel(got, ref, dtype)


@given(LEAD, WIDTH, OUT, EXACT_DTYPE, SEED, st.data())
def test_exact_rank_data_gives_exact_gradients(lead, width, out, dtype, seed, data):
    k = data.draw(st.integers(1, width), label="k")
    r = data.draw(st.integers(1, k), label="r")
    x = low_rank(lead, width, r, seed, dtype)
    w, b = params(width, out, seed, dtype)
    tracker = SubspaceTracker(width, cfg(rank=k))
    (gx, gw, gb), (rx, rw, rb), _ = grads(x, w, b, tracker, seed)
    assert_close_rel(gw, rw, dtype)
    assert_close_rel(gx, rx, dtype)


@given(LEAD, WIDTH, OUT, DTYPE, SEED, st.integers(1, 3))
def test_grad_input_and_bias_are_exact_at_any_rank(lead, width, out, dtype, seed, k):
    # rank 1..3 of random full-rank data: grad_weight is approximate, the others must not be
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, width, generator=g).to(dtype)
    w, b = params(width, out, seed, dtype)
    (gx, _, gb), (rx, _, rb), _ = grads(x, w, b, SubspaceTracker(width, cfg(rank=k)), seed)
    assert_close_rel(gx, rx, dtype)
    assert_close_rel(gb, rb, dtype)


@given(LEAD, WIDTH, OUT, SEED, st.integers(1, 6), st.sampled_from([0.5, 0.9, 0.99]))
def test_grad_weight_error_is_bounded_by_reconstruction_error(lead, width, out, seed, k, energy):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, width, generator=g)
    w, b = params(width, out, seed, torch.float32)
    for config in (cfg(rank=min(k, width)), cfg(energy=energy, fidelity=min(energy, 0.95))):
        tracker = SubspaceTracker(width, config)
        (_, gw, _), (_, rw, _), dy = grads(x, w, b, tracker, seed)
        x2 = x.reshape(-1, width).double()
        q = tracker.basis.double()
        resid = x2 - (x2 @ q) @ q.T if 0 < q.shape[1] < width else torch.zeros_like(x2)
        bound = torch.linalg.matrix_norm(dy.reshape(-1, out).double(), ord=2) * resid.norm()
        err = (gw.double() - rw.double()).norm()
        assert err <= bound + 1e-4 * (rw.norm() + 1), f"{err=} > {bound=}"


def test_gradient_error_does_not_grow_with_rank():
    torch.manual_seed(0)
    n, width, out = 96, 32, 8
    spectrum = torch.logspace(0, -2, width)
    u, _ = torch.linalg.qr(torch.randn(n, width))
    v, _ = torch.linalg.qr(torch.randn(width, width))
    x = (u * spectrum) @ v.T
    w, b = params(width, out, 0, torch.float32)
    errors = []
    for k in range(1, width + 1):
        (_, gw, _), (_, rw, _), _ = grads(x, w, b, SubspaceTracker(width, cfg(rank=k)), 0)
        errors.append((gw - rw).norm().item())
    assert all(b <= a + 1e-5 for a, b in zip(errors[:-1], errors[1:], strict=True)), errors
    assert errors[0] > 10 * errors[width // 2] and errors[-1] < 1e-5, errors


# ---------------------------------------------------------------- when (not) to compress
@pytest.mark.parametrize(
    "case",
    [
        pytest.param("no_grad", id="no-grad-mode"),
        pytest.param("frozen_weight", id="weight-without-grad"),
    ],
)
def test_plain_linear_when_input_is_not_needed(case):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, requires_grad=True)
    w = torch.randn(5, 16, requires_grad=case != "frozen_weight")
    tracker = SubspaceTracker(16, cfg(rank=2))
    if case == "no_grad":
        with torch.no_grad():
            y = compressed_linear(x, w, None, tracker)
    else:
        y = compressed_linear(x, w, None, tracker)
        y.sum().backward()
        torch.testing.assert_close(x.grad, torch.ones(4, 8, 5) @ w)
    assert torch.equal(y, F.linear(x, w))
    assert int(tracker.calls) == 0


def test_input_without_grad_gets_no_grad_and_weight_grad_is_computed():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    w = torch.randn(4, 16, requires_grad=True)
    compressed_linear(x, w, None, SubspaceTracker(16, cfg(energy=1.0))).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(32, 4).T @ x)
    assert x.grad is None


def test_create_graph_raises_a_library_error():
    torch.manual_seed(0)
    x = torch.randn(32, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    y = compressed_linear(x, w, None, SubspaceTracker(16, cfg(rank=2)))
    with pytest.raises(LaserFxError, match="create_graph"):
        torch.autograd.grad(y.sum(), (x, w), create_graph=True)


def test_saves_coefficients_not_the_input_and_frees_them_after_backward():
    torch.manual_seed(0)
    tracker = SubspaceTracker(64, cfg(rank=4))
    x = torch.randn(256, 4) @ torch.randn(4, 64)
    w = torch.randn(8, 64, requires_grad=True)
    x_ref = weakref.ref(x)
    y = compressed_linear(x, w, None, tracker)
    assert int(tracker.stored_bytes) == (256 * 4 + 64) * 4  # coefficients and the row mean
    basis_ref = weakref.ref(tracker.basis)
    del x
    assert x_ref() is None  # the graph does not hold the input
    tracker.basis = torch.linalg.qr(torch.randn(64, 4)).Q  # a newer version replaces it
    assert basis_ref() is not None  # ...but the graph still holds the one it projected with
    y.sum().backward()
    del y
    assert basis_ref() is None


@pytest.mark.parametrize("what", ["input", "input-view", "weight"])
def test_in_place_modification_after_forward_raises_in_backward(what):
    # The low-rank record hides the input from autograd's own version check; plain F.linear
    # raises here, so must compressed_linear (issue 14: modes auto/region were 12.6% off).
    torch.manual_seed(0)
    base = (torch.randn(64, 4) @ torch.randn(4, 16)).requires_grad_()
    x = base * 1.0
    inp = x[:, :8] if what == "input-view" else x
    w = torch.randn(4, inp.shape[-1], requires_grad=True)
    y = compressed_linear(inp, w, None, SubspaceTracker(inp.shape[-1], cfg(rank=4)))
    with torch.no_grad():
        (w if what == "weight" else x).add_(1.0)
    with pytest.raises((LaserFxError, RuntimeError), match="modified"):
        y.sum().backward()
