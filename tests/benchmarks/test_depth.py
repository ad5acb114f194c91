"""benchmarks/depth.py end to end on a tiny TRM (D=16, 3 / 6 / 12 grad-enabled calls, one timed
step), its budget answer, its dense-storage flag and its checkpoint loading. Nothing here is
timed: step times on a shared box say nothing in a test."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import laser_fx
from benchmarks import depth

TINY = ["--d", "16", "--n", "2", "--grad-cycles", "1", "2", "4", "--batch", "2", "--reps", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("depth")
    paths = {"out": d / "depth.md", "jsonl": d / "depth.jsonl", "plot": d / "peak.png"}
    records = depth.main([*TINY, "--budget-mib", "1", *(x for k, p in paths.items()
                                                         for x in (f"--{k}", str(p)))])
    return records, paths


def _by_config(point: dict) -> dict[str, dict]:
    return {r["arm"]: r for r in point["rows"]}


def test_every_depth_measures_every_configuration(run):
    (rec,), _ = run
    points = rec["points"]
    assert [p["calls"] for p in points] == [3, 6, 12]  # grad_cycles * (n + 1)
    for p in points:
        rows = _by_config(p)
        assert list(rows) == list(depth.CONFIGS)
        for r in rows.values():
            assert 0 < r["after_forward_bytes"] <= r["peak_bytes"], r
            assert r["q25_ms"] <= r["step_ms"] <= r["q75_ms"]
        for name in depth.LASER:
            assert "storage" in rows[name] and rows[name]["storage"]["sites"], name
        # the per-call arm checkpoints the block `net`, the per-layer arm each of its layers
        assert [s["site"] for s in rows[depth.LX_CALL]["storage"]["sites"]] == ["net"]
        assert [s["site"] for s in rows[depth.LX_LAYER]["storage"]["sites"]] == [
            "net.blocks.0", "net.blocks.1"]


def test_memory_grows_with_depth_and_checkpoints_flatten_it(run):
    (rec,), _ = run
    unc = [_by_config(p)[depth.UNC]["after_forward_bytes"] for p in rec["points"]]
    assert unc == sorted(unc) and unc[0] < unc[-1], unc
    slopes = rec["summary"]["slopes"]
    assert slopes[depth.UNC] > 0
    for name in (*depth.TORCH, *depth.LASER):
        assert 0 < slopes[name] < 0.1 * slopes[depth.UNC], (name, slopes)
    ratio = rec["summary"]["slope_ratio"]
    assert math.isclose(ratio["per call"], slopes[depth.LX_CALL] / slopes[depth.TC_CALL])


def test_gradients_match_uncompressed(run):
    (rec,), _ = run
    for p in rec["points"]:
        rows = _by_config(p)
        for name in depth.TORCH:  # exact recomputation
            assert rows[name]["grad_cosine"] > 0.99999, (p["calls"], name)
        assert rows[depth.LX_CALL]["grad_cosine"] > 0.999, p["calls"]


def test_table_jsonl_and_plot_are_written(run):
    (rec,), paths = run
    text = paths["out"].read_text()
    for name in depth.CONFIGS:
        # one row per depth, one in the slope table, one in the budget table
        assert text.count(f"| {name} |") == 3 + 2, name
    assert "Largest depth" in text and "per-call slope" in text.lower()
    lines = [json.loads(ln) for ln in paths["jsonl"].read_text().splitlines()]
    assert [ln["script"] for ln in lines] == ["depth"] * 4
    assert [ln.get("calls") for ln in lines[:3]] == [3, 6, 12] and "summary" in lines[3]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_answer_is_monotone_in_the_budget(run):
    (rec,), _ = run
    answers = [depth.summarize(rec["points"], mib * 2**20)["budget"] for mib in (0.1, 1, 4, 64)]
    for name in depth.CONFIGS:
        measured = [a[name]["measured"] for a in answers]
        fitted = [math.inf if a[name]["fitted"] == "unbounded" else a[name]["fitted"]
                  for a in answers]
        assert measured == sorted(measured) and fitted == sorted(fitted), (name, answers)
    # the largest budget fits every measured depth; uncompressed is the first to run out
    assert answers[-1][depth.UNC]["measured"] == 12
    assert answers[1][depth.UNC]["fitted"] < answers[1][depth.LX_CALL]["fitted"]


@given(budget=st.floats(0, 1e9), extra=st.floats(0, 1e9), slope=st.floats(1e-3, 1e7),
       intercept=st.floats(0, 1e8), unit=st.integers(1, 20))
def test_max_depth_within_is_the_largest_fitting_multiple(budget, extra, slope, intercept, unit):
    got = depth.max_depth_within(budget, slope, intercept, unit)
    assert got % unit == 0
    if got:  # it fits, one more cycle does not
        assert intercept + slope * got <= budget * (1 + 1e-12)
    assert intercept + slope * (got + unit) > budget * (1 - 1e-12)
    assert depth.max_depth_within(budget + extra, slope, intercept, unit) >= got


def test_max_depth_within_edges():
    assert depth.max_depth_within(10.0, 1.0, 20.0, 7) == 0  # not even one cycle fits
    assert depth.max_depth_within(30.0, 0.0, 20.0, 7) == math.inf  # flat peak
    assert depth.max_depth_within(34.0, 1.0, 20.0, 7) == 14


def _tiny_trm(**kw):
    model, task, size = depth.load_trm(mixer="attn", d=16, heads=None, n=2, T=2, grad_cycles=2,
                                       **kw)
    from examples.trm.data import make_dataset

    x, _ = make_dataset(task, size, 2, 0)
    return model, (x, *model.initial_carry(2))


# granularity "block": one site, `net`, as in the benchmark's "laser_fx per call" arm
@pytest.mark.parametrize(("config", "dense"), [
    (laser_fx.LaserConfig(granularity="block"), False),
    # every input kept as it is: rank 0
    (laser_fx.LaserConfig(granularity="block", min_numel=10**9), True),
], ids=["default-low-rank", "stored-dense"])
def test_laser_storage_flags_dense_inputs(config, dense):
    model, inputs = _tiny_trm()
    laser_fx.compress(model, config=config, example_inputs=inputs)
    model(*inputs)[0].sum().backward()
    got = depth.laser_storage(model)
    assert got["dense"] is dense, got
    assert got["label"].startswith("DENSE") is dense
    assert [s["site"] for s in got["sites"]] == ["net"]
    if not dense:
        assert got["inputs_ratio"] < depth.DENSE_RATIO and got["sites"][0]["rank"] > 0


def test_load_trm_reads_train_py_checkpoints(tmp_path):
    model, _ = _tiny_trm()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # not what a fresh init gives
    path = tmp_path / "maze7_seed0_baseline.pt"
    torch.save({"config": dataclasses.asdict(model.config),
                "state_dict": copy.deepcopy(model.state_dict()), "ema": None}, path)
    loaded, task, size = depth.load_trm(mixer="mlp_t", d=64, heads=None, n=None, T=5,
                                        grad_cycles=4, checkpoint=str(path))
    assert (task, size) == ("maze", 7)
    cfg = loaded.config  # shape from the file, recursion from the arguments
    assert (cfg.mixer, cfg.hidden_size, cfg.n, cfg.T, cfg.grad_cycles) == ("attn", 16, 2, 5, 4)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_load_trm_rejects_a_file_that_is_not_a_saved_model(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(SystemExit, match="not a model saved by examples/trm/train.py"):
        depth.load_trm(mixer="attn", d=16, heads=None, n=2, T=2, grad_cycles=1,
                       checkpoint=str(path))


def test_a_non_finite_reference_gradient_is_reported_not_scored(run):
    # regression: at 112 grad-enabled calls the random-init mlp_t TRM's float32 gradient
    # overflows (norm 1e24 at 56 calls, nan at 112); a nan cosine must read "n/a", not MISSED
    (rec,), _ = run
    points = copy.deepcopy(rec["points"])
    assert all(0 < p["grad_norm"] < math.inf for p in points)
    for p in points:
        p["calls"] *= 20  # past GOALS["min_calls"], so the goals are scored
        for r in p["rows"]:
            r["grad_cosine"] = math.nan
    text = depth._summary_text(depth.summarize(points, 2**20), 2**20)
    assert "n/a (non-finite gradient)" in text and "cosine >= 0.999 n/a" in text
    assert "cosine >= 0.999 MISSED" not in text and "cosine >= 0.999 ok" not in text
