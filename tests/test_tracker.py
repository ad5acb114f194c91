"""`SubspaceTracker`: orthonormal bases, reset rule, energy guarantee, state handling."""

from __future__ import annotations

import copy
import io
import math
import weakref

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from laser_fx.config import LaserConfig
from laser_fx.errors import ConfigError
from laser_fx.packed import Packed
from laser_fx.tracker import SubspaceTracker


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny factorizations on a shared, oversubscribed 2-core CPU stall on thread barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- strategies (one place)
WIDTH = st.integers(2, 48)
ROWS = st.integers(1, 96)
SEED = st.integers(0, 2**31 - 1)
ENERGY = st.sampled_from([0.5, 0.9, 0.99, 1.0])
STEP = st.tuples(st.integers(1, 12), st.floats(1e-3, 1e3), st.integers(0, 3))  # rank, scale, basis
STEPS = st.lists(STEP, min_size=1, max_size=6)


def put(tracker: SubspaceTracker, x: torch.Tensor) -> Packed:
    """Compress and take the decision about the call at once (normally one call late)."""
    packed = tracker.compress(x)
    tracker.settle()
    return packed


def cfg(**kw) -> LaserConfig:
    """Test config: compress even the tiny tensors that Hypothesis draws."""
    return LaserConfig(min_numel=0, **kw)


@st.composite
def configs(draw) -> LaserConfig:
    energy = draw(ENERGY)
    fixed = draw(st.one_of(st.none(), st.integers(1, 12)))
    return cfg(
        energy=energy,
        rank=fixed,
        fidelity=draw(st.floats(0.0, energy)),
        power_iters=draw(st.integers(0, 2)),
        oversample=draw(st.integers(0, 4)),
        center=draw(st.booleans()),
    )


def activation(n: int, width: int, rank: int, scale: float, subspace: int, seed: int):
    """``n x width`` data of rank <= ``rank`` in one of a few fixed subspaces, plus 1% noise."""
    g = torch.Generator().manual_seed(1000 * subspace + width)
    v = torch.linalg.qr(torch.randn(width, width, generator=g)).Q[:, : min(rank, width)]
    g.manual_seed(seed)
    spectrum = torch.logspace(0, -1, v.shape[1])
    x = (torch.randn(n, v.shape[1], generator=g) * spectrum) @ v.T
    return scale * (x + 0.01 * torch.randn(n, width, generator=g) / math.sqrt(width))


def fidelity_of(x: torch.Tensor, basis: torch.Tensor, center: bool = True) -> float:
    """Captured energy of the rows around their mean (``center``, the default config's),
    computed with the tracker's own operations."""
    x = x.reshape(-1, basis.shape[0]).float()
    if center:
        x = x - x.mean(0)
    total = float(torch.linalg.vector_norm(x).square())
    return min(1.0, float((x @ basis).square().sum()) / total) if total else 1.0


def assert_orthonormal(q: torch.Tensor) -> None:
    eye = torch.eye(q.shape[1])
    err = (q.T @ q - eye).abs().max().item() if q.shape[1] else 0.0
    assert err < 1e-5, f"QᵀQ - I = {err:.2e}"


def state_is_finite(t: SubspaceTracker) -> bool:
    return all(bool(torch.isfinite(b.float()).all()) for b in t.buffers())


# ---------------------------------------------------------------- properties
@given(WIDTH, ROWS, configs(), STEPS, SEED)
def test_basis_stays_orthonormal_and_fidelity_in_unit_interval(width, n, config, steps, seed):
    tracker = SubspaceTracker(width, config)
    for i, (rank, scale, sub) in enumerate(steps):
        x = activation(n, width, rank, scale, sub, seed + i)
        before = tracker.basis
        packed = put(tracker, x)
        assert_orthonormal(tracker.basis)
        assert tracker.basis.dtype == torch.float32 and int(tracker.rank) == tracker.basis.shape[1]
        assert 0.0 <= float(tracker.last_fidelity) <= 1.0
        assert 0.0 <= float(tracker.min_fidelity) <= float(tracker.last_fidelity)
        if not packed.is_dense:  # projected with the newest version (or the one the
            # decision then shrank to a prefix of its columns: a view of the same storage)
            assert packed.basis is tracker.basis or (
                tracker.basis.untyped_storage().data_ptr()
                == packed.basis.untyped_storage().data_ptr()
                and tracker.basis.shape[1] < packed.basis.shape[1])
            if before.shape[1] and tracker.basis is not before:
                assert before.data_ptr() != tracker.basis.data_ptr()  # a new tensor, not in place
            # the coefficients own exactly their bytes (a kept prefix of a refinement's
            # columns pins no larger buffer), in the k x N layout they are computed in
            c = packed.coeffs
            assert c.untyped_storage().nbytes() == c.numel() * c.element_size()
            assert c.T.is_contiguous()
    assert int(tracker.calls) == len(steps)


@given(WIDTH, ROWS, configs(), STEPS, SEED, st.sampled_from([torch.bfloat16, torch.float16]))
def test_autocast_around_the_tracker_changes_nothing(width, n, config, steps, seed, dtype):
    # a training forward under torch.autocast calls compress and decompress inside it: the
    # tracker's projections, decisions and reconstructions stay fp32, bit for bit
    plain, cast = SubspaceTracker(width, config), SubspaceTracker(width, config)
    for i, (rank, scale, sub) in enumerate(steps):
        x = activation(n, width, rank, scale, sub, seed + i)
        a = put(plain, x)
        with torch.autocast("cpu", dtype=dtype):
            b = put(cast, x)
            x_b = cast.decompress(b)
        x_a = plain.decompress(a)
        assert x_b.dtype == x.dtype and torch.equal(x_a, x_b)
        assert torch.equal(plain.basis, cast.basis)
        assert (a.coeffs is None) == (b.coeffs is None)
        if a.coeffs is not None:
            assert torch.equal(a.coeffs, b.coeffs)


@given(WIDTH, ROWS, STEPS, SEED, st.floats(0.05, 0.99))
def test_reset_happens_exactly_when_fidelity_falls_below_threshold(width, n, steps, seed, fid):
    tracker = SubspaceTracker(width, cfg(energy=1.0, fidelity=fid, power_iters=0))
    for i, (rank, scale, sub) in enumerate(steps):
        x = activation(n, width, rank, scale, sub, seed + i)
        first = tracker.basis.shape[1] == 0
        backing_off = int(tracker.backoff) > 0  # after an incompressible input: stores dense
        f = 0.0 if first else fidelity_of(x, tracker.basis)
        assume(abs(f - fid) > 1e-4)  # not a rounding coin flip at the threshold
        resets = int(tracker.resets)
        put(tracker, x)
        same_rows = bool((x == x[:1]).all())  # nothing left around the mean: kept exactly
        want = 0 if backing_off or same_rows else int(first or f < fid)
        assert int(tracker.resets) - resets == want, f"{f=} {fid=} {backing_off=}"
        assert int(tracker.power_updates) == 0


@given(WIDTH, ROWS, ENERGY, STEPS, SEED)
def test_after_a_reset_the_basis_keeps_the_requested_energy(width, n, energy, steps, seed):
    tracker = SubspaceTracker(width, cfg(energy=energy, fidelity=energy))
    for i, (rank, scale, sub) in enumerate(steps):
        x = activation(n, width, rank, scale, sub, seed + i)
        resets = int(tracker.resets)
        put(tracker, x)
        if int(tracker.resets) > resets and not int(tracker.backoff):
            got = fidelity_of(x, tracker.basis)
            assert got >= energy - 1e-5, f"kept {got:.6f} < energy {energy}"


def test_randomized_reset_keeps_energy_and_picks_the_data_rank():
    # min(rows, width) > 256 takes the randomized path, not the exact SVD
    torch.manual_seed(0)
    x = activation(320, 300, 12, 1.0, 0, seed=1)
    tracker = SubspaceTracker(300, cfg(energy=0.99))
    put(tracker, x)
    assert fidelity_of(x, tracker.basis) >= 0.99 - 1e-5
    assert 1 <= int(tracker.rank) <= 12
    assert_orthonormal(tracker.basis)


@pytest.mark.parametrize(
    "config, expect_rank",
    [
        pytest.param(cfg(rank=3), 3, id="fixed-rank"),
        pytest.param(cfg(energy=1.0, max_rank=5), 5, id="max-rank-caps-energy"),
        pytest.param(cfg(energy=1.0), 8, id="energy-1-finds-exact-rank"),
    ],
)
def test_rank_rules(config, expect_rank):
    tracker = SubspaceTracker(32, config)
    x = torch.randn(64, 8) @ torch.randn(8, 32)
    put(tracker, x)
    assert int(tracker.rank) == expect_rank


def test_drifting_subspace_is_tracked_by_power_iterations():
    # Like recursion steps: the same low-rank structure, rotating a little at every call.
    torch.manual_seed(0)
    n, d, r, steps = 128, 48, 4, 24
    skew = torch.randn(d, d)
    skew = 0.02 * (skew - skew.T)
    v0 = torch.linalg.qr(torch.randn(d, r)).Q
    tracker = SubspaceTracker(d, cfg(energy=0.99, fidelity=0.95, power_iters=1))
    for i in range(steps):
        v = torch.linalg.matrix_exp(skew * i) @ v0
        x = (torch.randn(n, r) * torch.tensor([4.0, 3.0, 2.0, 1.0])) @ v.T
        put(tracker, x + 0.01 * torch.randn(n, d))
    s = tracker.stats()
    assert s["resets"] <= 2, s
    assert s["power_updates"] >= 3, s  # the drift was real and was followed, not reset
    assert s["min_fidelity"] >= 0.95, s


def test_rank_shrinks_when_the_data_concentrates():
    torch.manual_seed(0)
    tracker = SubspaceTracker(32, cfg(energy=0.99, fidelity=0.9))
    put(tracker, activation(128, 32, 10, 1.0, 0, seed=0))
    wide = int(tracker.rank)
    x = activation(128, 32, 10, 1.0, 0, seed=1)
    x = x @ tracker.basis[:, :2] @ tracker.basis[:, :2].T  # same subspace, only 2 directions
    put(tracker, x)
    assert int(tracker.rank) == 2 < wide
    assert int(tracker.shrinks) == 1 and int(tracker.resets) == 1


# ---------------------------------------------------------------- storage
@pytest.mark.parametrize(
    "dtype, store, expect",
    [
        pytest.param(torch.float32, None, torch.float32, id="fp32"),
        pytest.param(torch.bfloat16, None, torch.bfloat16, id="bf16-keeps-dtype"),
        pytest.param(torch.float16, None, torch.float16, id="fp16-keeps-dtype"),
        pytest.param(torch.float32, torch.bfloat16, torch.bfloat16, id="store-dtype-wins"),
    ],
)
def test_coefficient_dtype_and_round_trip(dtype, store, expect):
    torch.manual_seed(0)
    x = (torch.randn(4, 16, 3) @ torch.randn(3, 40)).to(dtype)
    tracker = SubspaceTracker(40, cfg(rank=3, store_dtype=store))
    packed = put(tracker, x)
    assert packed.coeffs.dtype == expect and packed.coeffs.shape == (64, 3)
    assert tracker.basis.dtype == torch.float32
    x_hat = tracker.decompress(packed)
    assert x_hat.shape == x.shape and x_hat.dtype == dtype
    torch.testing.assert_close(
        x_hat.float(), x.float(), rtol=3e-2, atol=3e-2 * x.abs().max().item()
    )
    item = packed.coeffs.element_size()
    assert packed.mean.shape == (40,) and packed.mean.dtype == expect
    assert int(tracker.stored_bytes) == packed.nbytes == (64 * 3 + 40) * item  # coeffs + mean
    assert int(tracker.dense_bytes) == x.numel() * x.element_size()
    tracker.begin_step()
    assert int(tracker.stored_bytes) == int(tracker.dense_bytes) == 0


@pytest.mark.parametrize(
    "config, x",
    [
        pytest.param(cfg(energy=1.0), torch.randn(64, 16), id="full-rank-data"),
        pytest.param(cfg(rank=16), torch.randn(64, 16), id="rank-equals-width"),
        pytest.param(LaserConfig(), torch.randn(8, 16), id="below-min-numel"),
    ],
)
def test_dense_fallback_stores_the_input_exactly(config, x):
    tracker = SubspaceTracker(16, config)
    packed = put(tracker, x)
    assert packed.is_dense and packed.coeffs is None
    assert torch.equal(tracker.decompress(packed), x)
    assert int(tracker.dense_stores) == 1 and int(tracker.stored_bytes) == x.numel() * 4


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="inf"),
        pytest.param(-float("inf"), id="-inf"),
        pytest.param(3e38, id="overflows-fp32-energy"),
    ],
)
def test_nonfinite_input_is_stored_dense_and_leaves_state_untouched(bad):
    torch.manual_seed(0)
    tracker = SubspaceTracker(16, cfg(energy=0.9, fidelity=0.9))
    put(tracker, torch.randn(32, 2) @ torch.randn(2, 16))
    before = {k: v.clone() for k, v in tracker.state_dict().items()}
    x = torch.randn(32, 16)
    x[3, 5] = bad
    packed = put(tracker, x)
    assert packed.is_dense
    torch.testing.assert_close(tracker.decompress(packed), x, rtol=0, atol=0, equal_nan=True)
    assert int(tracker.nonfinite) == 1 and state_is_finite(tracker)
    for k in ("basis", "rank", "last_fidelity", "min_fidelity"):
        assert torch.equal(tracker.state_dict()[k], before[k]), k
    assert tracker.resets == 1


def test_zero_input_is_safe_before_and_after_a_basis_exists():
    tracker = SubspaceTracker(16, cfg(energy=0.9, fidelity=0.9))
    assert put(tracker, torch.zeros(32, 16)).is_dense  # nothing to build a basis from
    assert tracker.basis.shape == (16, 0) and state_is_finite(tracker)
    put(tracker, torch.randn(32, 2) @ torch.randn(2, 16))
    packed = put(tracker, torch.zeros(32, 16))
    assert not packed.is_dense and float(tracker.last_fidelity) == 1.0
    assert torch.equal(tracker.decompress(packed), torch.zeros(32, 16)) and state_is_finite(tracker)


def test_wrong_width_names_both_widths():
    tracker = SubspaceTracker(16, cfg())
    with pytest.raises(ConfigError, match=r"width 16.*last dim 12"):
        put(tracker, torch.randn(4, 12))


def test_global_rng_is_not_consumed():
    # a compressed model must draw the same dropout masks as the original
    torch.manual_seed(0)
    state = torch.get_rng_state()
    tracker = SubspaceTracker(32, cfg(energy=0.99, power_iters=2))
    for sub in range(3):
        put(tracker, activation(64, 32, 6, 1.0, sub, seed=sub))
    assert int(tracker.resets) + int(tracker.power_updates) >= 3
    assert torch.equal(torch.get_rng_state(), state)


def test_old_basis_version_is_freed_once_no_packed_refers_to_it():
    tracker = SubspaceTracker(32, cfg(energy=0.99, power_iters=0))
    p1 = put(tracker, activation(64, 32, 4, 1.0, 0, seed=0))
    old = weakref.ref(p1.basis)
    p2 = put(tracker, activation(64, 32, 4, 1.0, 1, seed=1))  # other subspace: reset
    assert p2.basis is tracker.basis is not old()
    assert old() is not None  # p1 still refers to it
    del p1
    assert old() is None


# ---------------------------------------------------------------- state handling
def _trained(width: int, rank: int) -> SubspaceTracker:
    tracker = SubspaceTracker(width, cfg(rank=rank))
    put(tracker, activation(64, width, rank, 1.0, 0, seed=0))
    return tracker


def test_state_dict_round_trip_across_ranks():
    src = _trained(24, 5)
    dst = _trained(24, 2)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.basis, src.basis) and dst.threshold() == src.threshold()
    assert dst.stats()["min_fidelity"] == src.stats()["min_fidelity"]
    fresh = SubspaceTracker(24, cfg(rank=5))
    fresh.load_state_dict(src.state_dict())
    assert torch.equal(fresh.basis, src.basis)
    with pytest.raises(RuntimeError, match="basis"):
        SubspaceTracker(20, cfg()).load_state_dict(src.state_dict())


def test_deepcopy_and_torch_save_weights_only():
    src = _trained(24, 3)
    clone = copy.deepcopy(src)
    assert torch.equal(clone.basis, src.basis) and clone.basis.data_ptr() != src.basis.data_ptr()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    loaded = SubspaceTracker(24, cfg(rank=3))
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(loaded.basis, src.basis) and loaded.threshold() == src.threshold()
    x = activation(16, 24, 3, 1.0, 0, seed=5)
    assert torch.equal(put(loaded, x).coeffs, put(src, x).coeffs)


def test_packed_repr_and_nbytes():
    p = Packed(shape=torch.Size([2, 3]), dtype=torch.float32, dense=torch.zeros(2, 3))
    assert p.nbytes == 24 and "dense" in repr(p)


def test_incompressible_activations_back_off_instead_of_updating_every_call():
    # Regression: high-rank activations (random init) paid a basis update on every call for
    # a small saving; now they are stored dense and the next _BACKOFF calls skip the tracking.
    from laser_fx.tracker import _BACKOFF

    torch.manual_seed(0)
    tracker = SubspaceTracker(32, cfg(energy=0.99))
    for _ in range(_BACKOFF + 1):
        x = torch.randn(256, 32)  # full-rank: 0.99 of its energy needs ~29 of 32 directions
        packed = put(tracker, x)
        assert packed.is_dense and torch.equal(tracker.decompress(packed), x)
    assert int(tracker.resets) == 1, "the backed-off calls must not update the basis"
    assert int(tracker.backoff) == 0
    put(tracker, torch.randn(256, 32))  # the back-off is over: it tries, backs off longer
    assert int(tracker.backoff) == 2 * _BACKOFF and int(tracker.resets) == 2
    low = torch.randn(256, 2) @ torch.randn(2, 32)  # and a compressible input compresses
    for _ in range(2 * _BACKOFF + 1):
        packed = put(tracker, low)
    assert not packed.is_dense
    put(tracker, torch.randn(256, 32))  # a success resets the back-off length
    assert int(tracker.backoff) == _BACKOFF


def test_backoff_doubles_up_to_its_cap_while_activations_stay_incompressible():
    from laser_fx.tracker import _BACKOFF, _BACKOFF_MAX

    torch.manual_seed(0)
    tracker = SubspaceTracker(16, cfg(energy=0.99))
    lengths = []
    for _ in range(2000):
        put(tracker, torch.randn(128, 16))
        if int(tracker.resets) > len(lengths):
            lengths.append(int(tracker.backoff))
    expected = [min(_BACKOFF * 2**i, _BACKOFF_MAX) for i in range(len(lengths))]
    assert lengths == expected and lengths[-1] == _BACKOFF_MAX
    assert int(tracker.resets) < 2000 / _BACKOFF_MAX + 8  # not one reset every 8 calls
    assert "backoff_next" not in tracker.state_dict()


@settings(deadline=None)
@given(WIDTH, st.integers(8, 64), st.integers(1, 4), SEED, st.floats(10.0, 1000.0))
def test_property_centering_keeps_what_varies_under_a_large_shared_offset(
    width, n, rank, seed, offset
):
    # The failure centering fixes: a component every row shares (a constant initial carry)
    # holds nearly all the energy, so an uncentered basis "keeps 99%" with that component
    # alone and drops the rows' differences. Centered, the differences keep `energy` of
    # their own energy and the offset is stored exactly.
    assume(rank < width)
    g = torch.Generator().manual_seed(seed)
    vary = torch.randn(n, rank, generator=g) @ torch.randn(rank, width, generator=g)
    x = offset * torch.randn(width, generator=g) + vary
    centered = x - x.mean(0)
    tracker = SubspaceTracker(width, cfg(energy=0.99))
    x_hat = tracker.decompress(put(tracker, x))
    err = float((x_hat - x).norm() / centered.norm())
    assert err <= 0.1 + 1e-4, f"centered: {err:.4f} of the varying part lost"
    assert int(tracker.rank) <= rank
    # the mean is part of each record: the bytes say so
    tracker = SubspaceTracker(width, cfg(rank=rank))
    p = put(tracker, x)
    if not p.is_dense:
        assert p.mean is not None and p.nbytes == (n * rank + width) * 4


def test_uncentered_tracker_loses_the_varying_part_under_a_shared_offset():
    torch.manual_seed(0)
    vary = torch.randn(256, 4) @ torch.randn(4, 64)
    x = 100.0 * torch.randn(64) + vary
    errs = {}
    for center in (True, False):
        tracker = SubspaceTracker(64, cfg(energy=0.99, center=center))
        x_hat = tracker.decompress(put(tracker, x))
        errs[center] = float((x_hat - x).norm() / (x - x.mean(0)).norm())
    assert errs[True] < 1e-3 and errs[False] > 0.3, errs


@settings(deadline=None, max_examples=60)
@given(
    st.lists(st.integers(1, 6), min_size=2, max_size=4),  # rows per call: few rows make the
    # centered mean row a large share of a record
    st.integers(4, 48),
    st.sampled_from([None, 1, 3]),
    st.sampled_from([0.5, 0.99, 0.999]),
    st.booleans(),
    SEED,
)
def test_property_a_record_is_never_larger_than_the_activation(rows_per_call, width, rank, energy,
                                                                center, seed):
    # regression: the "store dense" decision once compared per-row sizes only, so a centered
    # record (coefficients + one mean row) of a 1-row activation, after a basis existed,
    # outgrew the activation itself
    gen = torch.Generator().manual_seed(seed)
    tracker = SubspaceTracker(
        width, cfg(energy=energy, rank=None if rank is None else min(rank, width),
                   center=center, power_iters=1)
    )
    for rows in rows_per_call:
        x = torch.randn(rows, width, generator=gen)
        packed = put(tracker, x)
        assert packed.nbytes <= x.numel() * x.element_size(), (packed, tracker.stats())
        if packed.is_dense:
            assert torch.equal(tracker.decompress(packed), x)
    assert int(tracker.stored_bytes) <= int(tracker.dense_bytes)


def test_storage_stats_counts_packs_bases_once_and_skips_parameters():
    # StorageStats lives beside Packed (laser_fx.packed): what a mechanism kept, in bytes
    from laser_fx.packed import StorageStats

    trk = SubspaceTracker(16, LaserConfig(rank=2, min_numel=0))
    x = torch.randn(32, 2) @ torch.randn(2, 16)
    stats = StorageStats()
    packs = [put(trk, x), put(trk, x)]  # same basis version: counted once
    for p in packs:
        stats.add_packed(x, p)
    stats.add_passthrough(torch.randn(3, 5))
    stats.add_passthrough(torch.nn.Parameter(torch.randn(100)))  # a weight: not an activation
    assert packs[0].basis is packs[1].basis
    assert stats.packed == 2 and stats.dense_bytes == 2 * 32 * 16 * 4
    assert stats.stored_bytes == sum(p.nbytes for p in packs) < stats.dense_bytes
    assert stats.basis_bytes == 16 * 2 * 4
    assert stats.passthrough_bytes == 15 * 4
    d = stats.to_dict()
    assert d["total_stored_bytes"] == stats.stored_bytes + stats.basis_bytes + 15 * 4
    assert d["seen_bytes"] == stats.dense_bytes + 15 * 4
