"""The benchmark scripts run end to end on a tiny size and report every configuration with sane
fields. Nothing here is timed: step times on a shared box say nothing in a test."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import laser_fx
from benchmarks import fidelity, frontier, scaling, tracker_cost
from benchmarks._common import LASER_MODES, build_arms, trm_workload

TINY_TRM = ["--d", "16", "--n", "2", "--batch", "4"]
TINY_ALBERT = ["--albert-layers", "2", "--albert-batch", "2", "--albert-seq", "8"]
COMBO = "LASER linear inside torch checkpoint"
EVERY_ARM = {"uncompressed", "torch checkpoint", *LASER_MODES, COMBO}


def _check_row(row: dict, *, laser: bool) -> None:
    assert row["after_forward_bytes"] > 0 and row["peak_bytes"] >= row["after_forward_bytes"]
    assert row["memory_ratio"] > 0 and row["peak_ratio"] > 0
    assert -1.0 - 1e-6 <= row["grad_cosine"] <= 1.0 + 1e-6
    assert row["min_ms"] <= row["step_ms"] <= row["max_ms"] and row["time_ratio"] > 0
    if laser:
        assert 0.0 <= row["tracker_share"] <= 1.0, row


@pytest.fixture(scope="module")
def frontier_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("frontier")
    out, png = d / "b.jsonl", d / "f.png"
    records = frontier.main(["--models", *frontier.MODELS, *TINY_TRM, *TINY_ALBERT,
                             "--reps", "1", "--out", str(out), "--plot", str(png)])
    return records, out, png


def test_frontier_reports_every_configuration_for_every_model(frontier_run):
    records, out, png = frontier_run
    assert [r["model"] for r in records] == list(frontier.MODELS)
    for rec in records:
        got = {row["arm"] for row in rec["rows"]} | set(rec["notes"])
        assert got == EVERY_ARM, rec["workload"]
        for row in rec["rows"]:
            _check_row(row, laser=row["arm"].startswith("LASER"))
        base, ckpt = rec["rows"][0], rec["rows"][1]
        assert base["arm"] == "uncompressed" and base["memory_ratio"] == 1.0
        # exact checkpointing recomputes the same function: its gradient is the baseline's
        assert ckpt["grad_cosine"] > 0.9999
        assert ckpt["after_forward_bytes"] < base["after_forward_bytes"]
        auto = next(r for r in rec["rows"] if r["arm"] == frontier.AUTO)
        assert auto["grad_cosine"] > 0.999 and auto["memory_ratio"] < 0.5, auto
        for label, why in rec["notes"].items():  # an arm left out says why
            assert label == COMBO and why.startswith("does not compose"), why
    assert png.stat().st_size > 0
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [ln["script"] for ln in lines] == ["frontier"] * len(frontier.MODELS)


def test_build_arms_compresses_deep_copies_and_leaves_the_model_alone():
    w = trm_workload(mixer="mlp_t", d=16, n=2, T=2, batch=4)
    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    arms, _ = build_arms(w, combo=False)
    assert arms[0].module is w.model and not laser_fx.is_compressed(w.model)
    own = {id(p) for p in w.model.parameters()}
    for arm in arms[1:]:
        assert laser_fx.is_compressed(arm.module) == arm.laser, arm.name
        assert not own & {id(p) for p in arm.params}, f"{arm.name} shares the model's weights"
        assert [p.shape for p in arm.params] == [p.shape for p in arms[0].params]
        for k, v in arm.module.state_dict().items():  # same initial weights, same keys
            torch.testing.assert_close(v, before[k.replace(".inner.", ".")])


def test_fidelity_sweep_is_exact_at_full_energy():
    rows = fidelity.sweep(mixer="mlp_t", d=16, n=2, T=2, batch=4, energies=[0.9, 1.0],
                          modes=["auto"], device="cpu", warm_steps=1)
    assert [(r["mode"], r["energy"]) for r in rows] == [("auto", 0.9), ("auto", 1.0)]
    assert rows[1]["grad_cosine"] > 0.99999 and rows[1]["grad_rel_error"] < 1e-3
    assert rows[0]["grad_rel_error"] >= rows[1]["grad_rel_error"]
    for r in rows:
        assert 0 < r["memory_ratio"] < 1 and r["ranks"]


def test_tracker_cost_times_every_width(capsys):
    rows = tracker_cost.main(["--widths", "16", "32", "--tokens", "64", "--reps", "1"])
    assert [r["width"] for r in rows] == [16, 32]
    for r in rows:
        assert 0 <= r["k"] <= r["width"]  # 0: the tracker stores this one dense
        assert all(r[key] > 0 for key in ("projection", "power", "reset", "svd", "matmul"))
    assert capsys.readouterr().out.count("\n| ") == 3  # header + one row per width


def test_frontier_table_lists_every_configuration_and_the_goals(frontier_run):
    rows = frontier_run[0][0]["rows"]
    table = frontier.markdown_table(rows)
    for row in rows:
        assert f"| {row['arm']} |" in table
    assert "mem<=0.40x" in table and "tracker<=5%" in table


@pytest.mark.parametrize(("memory", "time", "tracker", "expect", "absent"), [
    (0.01, 1.05, 0.01, "time<=1.10x ok", "MISSED"),
    (0.50, 1.05, 0.01, "mem<=0.40x MISSED", None),
    (0.01, 1.30, 0.01, "time<=1.10x MISSED", "time<=1.40x MISSED"),
    (0.01, 1.05, 0.20, "tracker<=5% MISSED", None),
], ids=["all-met", "memory-missed", "only-1.10-missed", "tracker-missed"])
def test_goal_marks(memory, time, tracker, expect, absent):
    row = {"memory_ratio": memory, "time_ratio": time, "tracker_share": tracker,
           "after_forward_bytes": 1}
    marks = frontier.goal_marks(row, {"after_forward_bytes": 2})
    assert expect in marks
    if absent:
        assert absent not in marks


def test_write_jsonl_replaces_only_its_own_script(tmp_path):
    p = tmp_path / "r.jsonl"
    frontier.write_jsonl(str(p), "scaling", {"x": 1}, fresh=True)
    frontier.write_jsonl(str(p), "frontier", {"x": 2}, fresh=True)
    frontier.write_jsonl(str(p), "frontier", {"x": 3}, fresh=True)
    got = [json.loads(ln) for ln in p.read_text().splitlines()]
    assert got == [{"script": "scaling", "x": 1}, {"script": "frontier", "x": 3}]


@given(st.floats(-1e6, 1e6), st.floats(-1e8, 1e8),
       st.lists(st.integers(1, 64), min_size=2, max_size=8, unique=True))
def test_fit_slope_recovers_a_line(slope, intercept, xs):
    s, c = scaling.fit_slope(xs, [slope * x + intercept for x in xs])
    assert math.isclose(s, slope, rel_tol=1e-6, abs_tol=1e-3)
    assert math.isclose(c, intercept, rel_tol=1e-6, abs_tol=1e-1)


def test_scaling_runs_every_point_and_fits_slopes(tmp_path):
    out, png = tmp_path / "s.jsonl", tmp_path / "s.png"
    res = scaling.main(["--n-values", "2", "3", "--n-width", "16", "--d-values", "16", "32",
                        "--d-depth", "2", "--batch", "2", "--reps", "1", "--big-reps", "1",
                        "--out", str(out), "--plot", str(png)])
    assert [p["n"] for p in res["n"]] == [2, 3] and [p["d"] for p in res["d"]] == [16, 32]
    for pt in res["n"] + res["d"]:
        assert {r["arm"] for r in pt["rows"]} == set(scaling.ARMS)
        for row in pt["rows"]:
            _check_row(row, laser=row["arm"] == frontier.AUTO)
    # each extra recursion step keeps more bytes uncompressed; LASER keeps fewer per step
    assert res["slopes"]["uncompressed"] > 0
    assert res["slopes"][frontier.AUTO] < res["slopes"]["uncompressed"]
    assert math.isclose(res["slope_ratio"],
                        res["slopes"][frontier.AUTO] / res["slopes"]["uncompressed"])
    assert png.stat().st_size > 0
    assert len(out.read_text().splitlines()) == 5  # 4 points + the slopes


def test_host_syncs_counts_sync_warnings_by_line_and_reissues_the_others(monkeypatch):
    # the CUDA path without a GPU: torch's sync-debug switch is stubbed, the warning that
    # torch issues under set_sync_debug_mode("warn") is raised by hand
    import warnings

    from benchmarks import _common

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with pytest.warns(UserWarning, match="unrelated"):
        with _common.host_syncs("cuda") as found:
            assert modes == ["warn"]
            for _ in range(3):
                warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
            warnings.warn("unrelated", UserWarning, stacklevel=1)
    assert modes == ["warn", 0]  # switched back
    [(where, n)] = found.items()
    assert n == 3 and where.startswith("benchmarks/test_benchmark_scripts.py:")
    row = _common.sync_row(found, steps=2)
    assert row == {"host_syncs_per_step": 1.5, "host_sync_sources": {where: 1.5}}
    table = frontier.markdown_table([
        {"arm": "torch checkpoint", "memory_ratio": 1.0, "after_forward_bytes": 1,
         "peak_ratio": 1.0, "peak_bytes": 1, "grad_cosine": 1.0, **row}])
    assert "host syncs / step" in table and f"{where} (1.5)" in table


def test_host_syncs_counts_nothing_on_a_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode",
                        lambda mode: pytest.fail("switched on a CPU"))
    from benchmarks._common import host_syncs

    with host_syncs("cpu") as found:
        torch.ones(3).sum().item()
    assert not found
