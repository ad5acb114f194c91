"""Tests of laser_fx.analysis: spectra, drift, tracking, capture of grad-enabled uses, report."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import laser_fx
from laser_fx.analysis import (
    Analysis,
    Capture,
    analyze,
    analyze_capture,
    effective_rank,
    participation_ratio,
    plot_analysis,
    principal_angles,
    singular_values,
    top_basis,
    track_subspace,
    write_markdown,
)
from laser_fx.config import LaserConfig
from laser_fx.errors import ConfigError
from laser_fx.testing.zoo import TRMLike, make_inputs

SEED = st.integers(0, 2**16)
WIDTH = st.integers(4, 24)
ROWS = st.integers(4, 40)


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def _rotating(width: int, rank: int, rows: int, steps: int, thetas: list[float], seed: int,
              sigma: list[float]) -> list[torch.Tensor]:
    """Rank-`rank` activations whose row space turns by ``thetas[j]`` (column j) per step.

    Column j of the basis at step t is ``u_j cos(t θ_j) + w_j sin(t θ_j)`` with all u, w
    orthonormal, so the principal angles between consecutive steps are exactly the θ_j.
    """
    g = torch.Generator().manual_seed(seed)
    uw = _orthonormal(width, 2 * rank, g)
    u, w = uw[:, :rank], uw[:, rank:]
    th = torch.tensor(thetas, dtype=torch.float64)
    out = []
    for t in range(steps):
        q = u * torch.cos(t * th) + w * torch.sin(t * th)
        a = _orthonormal(rows, rank, g)
        out.append(a @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ q.T)
    return out


def _capture(mats: list[torch.Tensor]) -> Capture:
    return Capture("site", "linear", 0, mats[0].shape[1], list(range(len(mats))), mats,
                   len(mats))


# ------------------------------------------------------------------ known rank, known drift
@pytest.mark.parametrize("width,rank,thetas", [
    (16, 3, [0.01, 0.2, 0.5]),
    (32, 5, [1e-3, 0.05, 0.1, 0.3, 0.7]),
    (12, 1, [0.4]),
], ids=["w16-r3", "w32-r5", "w12-r1"])
def test_recovers_rank_and_principal_angles(width, rank, thetas):
    sigma = [float(2 ** -i) * 10 for i in range(rank)]  # distinct: top-k is well defined
    mats = _rotating(width, rank, rows=40, steps=4, thetas=thetas, seed=1, sigma=sigma)
    an = analyze_capture(_capture(mats), ks=[rank], config=LaserConfig())
    total = sum(s * s for s in sigma)
    cum = [sum(s * s for s in sigma[: i + 1]) / total for i in range(rank)]
    want99 = next(i + 1 for i, c in enumerate(cum) if c >= 0.99)
    for step, x in zip(an.steps, mats, strict=True):
        assert effective_rank(singular_values(x), 1.0) == rank
        assert step["erank99"] == want99
        assert step["rank_k_energy"][0] == pytest.approx(1.0, abs=1e-12)
    for t in range(1, len(mats)):
        got = principal_angles(top_basis(mats[t - 1], rank), top_basis(mats[t], rank))
        assert torch.allclose(got, torch.tensor(sorted(thetas), dtype=torch.float64),
                              atol=1e-4, rtol=0), (got, thetas)
        assert an.steps[t]["drift_max_deg"][0] == pytest.approx(math.degrees(max(thetas)),
                                                                abs=math.degrees(1e-4))


def test_power_iteration_tracks_exactly_low_rank_data():
    # rank-r data tracked at k = r: one iteration maps any non-degenerate start onto the
    # row space, so the tracked subspace is exact however far it turned
    mats = _rotating(20, 4, 30, 5, [0.1, 0.3, 0.6, 1.0], seed=3, sigma=[5, 3, 2, 1])
    for iters in (1, 2):
        for rec in track_subspace(mats, 4, iters):
            assert rec["sin_max"] < 1e-8 and rec["energy_gap"] < 1e-10


def test_one_iteration_lags_on_noisy_drift():
    # with a full-rank tail, one iteration from the old basis is not the new top-k: the
    # error must be positive and shrink with the second iteration
    g = torch.Generator().manual_seed(0)
    mats = [m + 0.3 * torch.randn(m.shape, generator=g, dtype=torch.float64)
            for m in _rotating(24, 3, 60, 4, [0.3, 0.4, 0.5], seed=2, sigma=[6, 5, 4])]
    one, two = track_subspace(mats, 3, 1), track_subspace(mats, 3, 2)
    assert all(r["energy_gap"] > 0 for r in one[1:])
    assert sum(r["sin_max"] for r in two[1:]) < sum(r["sin_max"] for r in one[1:])


# ------------------------------------------------------------------ properties
@given(WIDTH, ROWS, SEED, st.floats(0.05, 1.0), st.floats(0.05, 1.0))
def test_effective_rank_monotone_in_energy(width, rows, seed, e1, e2):
    g = torch.Generator().manual_seed(seed)
    decay = torch.rand(width, generator=g, dtype=torch.float64) ** 3
    x = torch.randn(rows, width, generator=g, dtype=torch.float64) * decay
    s = singular_values(x)
    lo, hi = sorted((e1, e2))
    assert 1 <= effective_rank(s, lo) <= effective_rank(s, hi) <= min(rows, width)


@given(WIDTH, ROWS, SEED, st.integers(1, 24))
def test_participation_ratio_bounds(width, rows, seed, rank):
    g = torch.Generator().manual_seed(seed)
    rank = min(rank, width, rows)
    x = torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, width, generator=g, dtype=torch.float64)
    pr = participation_ratio(singular_values(x))
    assert 1.0 - 1e-9 <= pr <= rank + 1e-9 <= width + 1e-9


@given(st.integers(6, 20), SEED, st.integers(1, 4))
def test_principal_angles_properties(width, seed, k):
    g = torch.Generator().manual_seed(seed)
    a, b = _orthonormal(width, k, g), _orthonormal(width, k, g)
    ab, ba = principal_angles(a, b), principal_angles(b, a)
    assert torch.all(ab >= 0) and torch.all(ab <= math.pi / 2 + 1e-12)
    assert torch.allclose(ab, ba, atol=1e-10)
    rot = _orthonormal(k, k, g)  # same subspace, other basis
    assert principal_angles(a, a @ rot).max() < 1e-7


@given(st.integers(6, 16), st.integers(8, 30), SEED, st.integers(2, 4))
def test_to_dict_round_trips_through_json(width, rows, seed, steps):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(rows, width, generator=g, dtype=torch.float64) for _ in range(steps)]
    site = analyze_capture(_capture(mats), ks=[1, 2, 4, 64], config=LaserConfig())
    an = Analysis(model="m", ks=[1, 2, 4, 64], sites=[site], memory={}, config={"energy": 0.99})
    d = an.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert Analysis.from_dict(json.loads(json.dumps(d))).to_dict() == d


# ------------------------------------------------------------------ end to end
def test_analyze_trm_records_only_grad_enabled_uses(tmp_path):
    torch.manual_seed(0)
    model = TRMLike(d=16, seq=8, n=2, T=2)
    inputs = make_inputs(model, batch=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    an = analyze(model, inputs, ks=[1, 4, 8])
    sites = {s.name: s for s in laser_fx.find_sites(model, inputs)}
    assert {s.site for s in an.sites} == set(sites)
    for s in an.sites:
        grad = [i for i, u in enumerate(sites[s.site].uses) if u.grad_enabled]
        assert 0 < len(grad) < sites[s.site].num_uses  # TRM: T-1 cycles ran under no_grad
        assert s.uses == grad and len(s.steps) == len(grad)
        assert s.calls == sites[s.site].num_uses
    # the shared block's two inputs (z, x + y); its sub-blocks are sites nested in it
    top = {s.key for s in an.sites if s.kind == "module" and sites[s.site].block is None}
    assert top == {"net[0]", "net[1]"}
    assert all(sites[s.site].block == "net" for s in an.sites if s.key not in top)
    # memory at the default config: granularity "auto" checkpoints `net` per layer, and those
    # units are analyzed sites too (the site table shows what each saved)
    assert set(an.memory) == {"net.blocks.0", "net.blocks.1"} <= {s.site for s in an.sites}
    assert all(m["mechanism"] == "checkpoint" and m["dense_bytes"] > 0
               for m in an.memory.values()), an.memory
    for k, v in model.state_dict().items():  # the analysis leaves the model as it was
        assert torch.equal(v, state[k]), k
    assert json.loads(json.dumps(an.to_dict())) == an.to_dict()
    pngs = plot_analysis(an, tmp_path, "trm")
    assert len(pngs) == 4 and all(p.stat().st_size > 1000 for p in pngs)
    text = write_markdown([an], tmp_path / "a.md").read_text()
    assert "(a) effectively linear" in text and "`net[0]`" in text


def test_analyze_rejects_bad_arguments():
    model = TRMLike(d=16, seq=8, n=1, T=1)
    inputs = make_inputs(model, batch=8)
    with pytest.raises(ConfigError, match="ks"):
        analyze(model, inputs, ks=[0], memory=False)
    with pytest.raises(ConfigError, match="matches no site"):
        analyze(model, inputs, sites="nothing.*", memory=False)


def test_plot_without_matplotlib_names_the_fix(monkeypatch, tmp_path):
    mats = _rotating(8, 2, 10, 2, [0.1, 0.2], seed=0, sigma=[2, 1])
    site = analyze_capture(_capture(mats), ks=[1], config=LaserConfig())
    an = Analysis(model="m", ks=[1], sites=[site], memory={}, config={})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match="matplotlib"):
        plot_analysis(an, tmp_path, "x")
