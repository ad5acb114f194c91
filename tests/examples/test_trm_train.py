"""Tests for examples/trm/train.py, summary.py, experiment.py: runs, JSON, statistics, resume."""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import laser_fx
from examples.trm import experiment, summary, train
from examples.trm.model import TRM, TRMConfig
from examples.trm.training import predict

TINY = {
    "task": "sudoku", "size": 4, "mixer": "mlp_t", "d": 16, "heads": 2, "n": 2, "T": 2,
    "batch": 8, "max_sup_steps": 2, "steps": 4, "n_train": 32, "n_test": 16, "warmup": 1,
}


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{**TINY, "progress": False, **kw})


@pytest.fixture(scope="module")
def three_arms() -> dict:
    return train.run(_args(seeds=[0], deep_T=3, deep_steps=2), log=lambda s: None)


def test_run_trains_three_arms_and_measures_a_deeper_setting(three_arms: dict) -> None:
    (r,) = three_arms["runs"]
    assert list(r["arms"]) == ["baseline", "checkpoint", "laser"]
    for a in r["arms"].values():
        assert a["activation_bytes"] > 0 and a["peak_bytes"] >= a["activation_bytes"]
        assert a["step_time_median_s"] > 0 and math.isfinite(a["loss_last"])
        assert len(a["losses"]) == TINY["steps"]
        for weights in ("raw", "ema"):
            assert 0.0 <= a["eval"][weights]["exact_acc"] <= a["eval"][weights]["token_acc"] <= 1.0
    base, ckpt, laser = (r["arms"][k]["activation_bytes"] for k in train.ARMS)
    # D=16 inputs are full-rank: LASER may store them exactly, never more than torch does
    assert laser <= ckpt < base, f"kept for backward: {base}, {ckpt}, {laser} B"
    assert 0 < r["memory_ratio"] < 1 and r["step_time_ratio"] > 0
    assert set(r["vs_checkpoint"]) == {"activation", "peak", "step_time"}
    assert [s["name"] for s in r["laser_report"]["sites"]] == ["net"]  # the shared block
    assert {w for w, _ in r["laser_ranks"]["net"].values()} == {TINY["d"]}  # z and y + x
    assert 0 < r["compress_seconds"] < 5.0, "compress is one probe run and one check run"
    assert r["setting"] == {"n": 2, "T": 2, "grad_cycles": 1, "grad_calls": 3}
    deep = r["deeper"]
    assert deep["setting"] == {"n": 2, "T": 3, "grad_cycles": 3, "grad_calls": 9}
    assert list(deep["arms"]) == list(train.ARMS) and "eval" not in deep["arms"]["baseline"]
    for name in train.ARMS:  # more grad-enabled block calls keep more, in every arm
        assert deep["arms"][name]["activation_bytes"] > r["arms"][name]["activation_bytes"], name
    assert deep["laser_report"]["sites"][0]["grad_uses"] == 9
    json.dumps(three_arms)  # the whole result is JSON-ready


def test_uncompressed_and_torch_checkpoint_arms_train_identically(three_arms: dict) -> None:
    # same initial weights, same batches: the exact re-run makes every step's loss bit-equal
    arms = three_arms["runs"][0]["arms"]
    assert arms["checkpoint"]["losses"] == arms["baseline"]["losses"]
    assert arms["checkpoint"]["eval"] == arms["baseline"]["eval"]


def test_laser_at_energy_one_trains_like_the_uncompressed_arm() -> None:
    out = train.run(_args(seeds=[0], arms=["baseline", "laser"], energy=1.0, ema_decay=0.0),
                    log=lambda s: None)
    arms = out["runs"][0]["arms"]
    assert list(arms) == ["baseline", "laser"] and out["runs"][0]["vs_checkpoint"] is None
    assert out["runs"][0]["laser_report"]["sites"][0]["calls"] > 0  # through the wrapper
    torch.testing.assert_close(arms["laser"]["losses"], arms["baseline"]["losses"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", [None, "linear"])
def test_compiled_training_loop_matches_eager_at_energy_one(mode) -> None:
    # --compile: each arm's training forward under torch.compile, in the example's own loop
    # (ACT carries, AdamW, EMA). The default traces each block call (laser_fx::pack / rerun);
    # linear mode each linear op of the block (laser_fx::pack_linear: no re-run)
    from laser_fx.ops import _compiled

    torch._dynamo.reset()
    kw = dict(seeds=[0], arms=["baseline", "laser"], energy=1.0, ema_decay=0.0, steps=3,
              mode=mode)
    first_token = next(_compiled.TOKENS)
    compiled = train.run(_args(compile="aot_eager", **kw), log=lambda s: None)
    traced_calls = next(_compiled.TOKENS) - first_token - 1
    eager = train.run(_args(**kw), log=lambda s: None)
    torch._dynamo.reset()
    (c,), (e,) = compiled["runs"], eager["runs"]
    for arm in ("baseline", "laser"):
        assert c["arms"][arm]["losses"] == pytest.approx(e["arms"][arm]["losses"], rel=1e-4)
    # every grad-enabled block call (n + 1 per training step) went through the traced ops:
    # once, or once per linear op (a block's mixer and SwiGLU apply two weights each)
    per_call = 1 if mode is None else 4 * TRMConfig.num_blocks
    assert traced_calls == 3 * (TINY["n"] + 1) * per_call, traced_calls
    assert {s["mechanism"] for s in c["laser_report"]["sites"]} == {mode or "checkpoint"}


def test_summary_shows_three_arms_both_settings_and_what_laser_stored(three_arms: dict) -> None:
    text = train.summarize(three_arms)
    for label in ("uncompressed", "torch checkpoint", "laser_fx"):
        rows = [ln for ln in text.splitlines() if re.match(rf"\s*{label}\s+[\d.]+ MiB", ln)]
        assert len(rows) == 2, f"{label}: one row per setting, got {rows}"
    assert "3 grad-enabled block calls" in text and "9 grad-enabled block calls" in text
    assert "laser_fx / torch checkpoint: activation memory" in text
    assert "laser_fx.compress (in place" in text
    assert text.count("laser_fx stores") == 2  # low-rank bases, or why not, per setting
    assert "EMA" not in text  # evaluated into the JSON only


@pytest.mark.parametrize(
    ("ranks", "config", "expected"),
    [
        pytest.param({"net": {"in0": [64, 14], "in1": [64, 13]}}, {},
                     "low-rank bases (net inputs: rank 14, 13 of width 64)", id="low-rank"),
        pytest.param({"net": {"in0": [64, 0], "in1": [64, 0]}}, {"energy": 0.999},
                     "exactly (rank 0): at energy 0.999 they need more than 3/4 of the width;"
                     " it equals torch checkpoint here", id="dense-energy"),
        pytest.param({"net": {"in0": [64, 0]}}, {"rank": 60},
                     "exactly (rank 0): at rank 60 the coefficients", id="dense-rank"),
    ],
)
def test_laser_line_gives_the_ranks_or_says_why_it_stores_exactly(ranks, config, expected):
    block = {"laser_ranks": ranks, "laser_report": {"totals": {
        "stored_bytes": 2**20, "dense_bytes": 2**24, "ratio": 2**-4}}}
    line = summary._laser_line(block, config)
    assert expected in line and "(0.062x)" in line


def test_quick_is_what_make_demo_runs_three_arms_and_a_deeper_setting() -> None:
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "examples/trm/train.py --quick" in recipe
    opts = train.options(argparse.Namespace(quick=True))
    assert {k: getattr(opts, k) for k in train.QUICK} == train.QUICK
    assert opts.arms == list(train.ARMS)
    shallow = opts.grad_cycles * (opts.n + 1)
    deep = (opts.deep_grad_cycles or opts.deep_T) * ((opts.deep_n or opts.n) + 1)
    assert deep >= 4 * shallow, "the deeper setting must store clearly more checkpoints"
    assert train.options(argparse.Namespace(quick=True, out=Path("x.json"))).out == Path("x.json")


def test_main_writes_json_summary_and_plot(tmp_path) -> None:
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "steps"]
    out = tmp_path / "demo.json"
    assert train.main([*argv, "--steps=2", "--ema-decay=0", "--deep-T=2", "--deep-steps=2",
                       "--no-progress", f"--out={out}"]) == 0
    result = json.loads(out.read_text())
    assert list(result["runs"][0]["deeper"]["arms"]) == list(train.ARMS)
    md = (tmp_path / "demo.md").read_text()
    assert "torch checkpoint" in md and "![memory per arm and setting](demo.png)" in md
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mixer", ["mlp_t", "attn"])
def test_torch_checkpoint_arm_keeps_keys_forward_and_gradients(mixer: str) -> None:
    torch.manual_seed(0)
    model = TRM(TRMConfig(vocab_size=6, seq_len=16, hidden_size=16, num_heads=2, n=2, T=2,
                          mixer=mixer))
    tokens = torch.randint(1, 6, (4, 16), generator=torch.Generator().manual_seed(3))
    twin = train.torch_checkpointed(copy.deepcopy(model))
    assert isinstance(twin.net, train.TorchCheckpoint)
    assert list(twin.state_dict()) == list(model.state_dict())  # the wrapper hides its prefix
    twin.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(twin.state_dict(), strict=True)
    for m in (model, twin):
        logits, q, _, _ = m(tokens, *m.initial_carry(4))
        (logits.square().mean() + q.sum()).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


@given(st.integers(1, 3), st.integers(1, 3), st.data())
def test_property_grad_cycles_set_the_grad_enabled_block_calls(n: int, T: int, data) -> None:
    k = data.draw(st.integers(1, T), label="grad_cycles")
    torch.manual_seed(0)
    model = TRM(TRMConfig(vocab_size=6, seq_len=16, hidden_size=16, num_heads=2, n=n, T=T,
                          grad_cycles=k, mixer="mlp_t"))
    tokens = torch.randint(1, 6, (2, 16), generator=torch.Generator().manual_seed(1))
    (net,) = [s for s in laser_fx.find_sites(model, (tokens, *model.initial_carry(2)))
              if s.name == "net"]
    assert net.num_uses == T * (n + 1) and net.grad_uses == k * (n + 1)


def test_memory_grows_with_grad_cycles_in_every_arm() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(1, 6, (8, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(1, 6, (8, 16), generator=torch.Generator().manual_seed(2))
    kept: dict[str, list[int]] = {name: [] for name in train.ARMS}
    for k in (1, 2, 3):
        base = TRM(TRMConfig(vocab_size=6, seq_len=16, hidden_size=16, num_heads=2, n=2, T=3,
                             grad_cycles=k, mixer="mlp_t"))
        args = train.options(_args(seeds=[0]))
        models, _ = train._build_arms(base, args, tokens)
        for name, m in models.items():
            kept[name].append(train._memory(m, tokens, labels)["activation_bytes"])
    for name, xs in kept.items():
        assert xs[0] < xs[1] < xs[2], f"{name}: {xs}"


def test_run_without_laser_trains_only_the_baseline() -> None:
    out = train.run(_args(seeds=[1], laser=False, steps=2), log=lambda s: None)
    (r,) = out["runs"]
    assert set(r["arms"]) == {"baseline"} and "memory_ratio" not in r


# the default granularity "auto" splits `net` where that has the smaller estimated peak: per
# sublayer (each layer's mix and mlp) for mlp_t, per layer for attn at this size
@pytest.mark.parametrize(("mixer", "chosen", "units"), [
    ("mlp_t", "sublayer", [f"net.blocks.{i}.{m}" for i in (0, 1) for m in ("mix", "mlp")]),
    ("attn", "layer", ["net.blocks.0", "net.blocks.1"]),
], ids=["mlp_t", "attn"])
def test_compressed_twin_is_a_trm_with_the_same_forward_and_keys(mixer: str, chosen: str,
                                                                  units: list[str]) -> None:
    torch.manual_seed(0)
    model = TRM(TRMConfig(vocab_size=6, seq_len=16, hidden_size=16, num_heads=2, n=2, T=2,
                          mixer=mixer))
    tokens = torch.randint(1, 6, (8, 16), generator=torch.Generator().manual_seed(3))
    y, z = model.initial_carry(8)
    twin = copy.deepcopy(model)
    assert laser_fx.compress(twin, example_inputs=(tokens, y, z)) is twin  # in place
    assert isinstance(twin, TRM) and type(twin.net) is type(model.net)  # split, not wrapped
    assert all(isinstance(twin.get_submodule(u), laser_fx.SiteWrapper) for u in units)
    rep = laser_fx.report(twin)
    assert [r["name"] for r in rep.sites] == units
    g = rep.granularity["net"]
    assert (g["chosen"], g["asked"], g["units"]) == (chosen, "auto", units)
    assert g["estimated_peak_bytes"][chosen] == min(g["estimated_peak_bytes"].values())
    for got, want in zip(twin(tokens, y, z), model(tokens, y, z), strict=True):
        torch.testing.assert_close(got, want)
    yt, zt = twin.initial_carry(8)  # the training loop's own method still works
    torch.testing.assert_close(yt, y)
    assert list(twin.state_dict()) == list(model.state_dict())
    model.load_state_dict(twin.state_dict(), strict=True)
    # evaluation (eval mode, no grad: the wrapper calls the plain block) predicts the same
    twin.eval()
    model.eval()
    assert not any(m.training for m in twin.modules())
    torch.testing.assert_close(predict(twin, tokens, 2)[0], predict(model, tokens, 2)[0])
    laser_fx.strip(twin)
    assert not laser_fx.is_compressed(twin) and isinstance(twin.net, type(model.net))
    assert not any(isinstance(m, laser_fx.SiteWrapper) for m in twin.modules())  # every unit


def test_tiny_training_reduces_the_loss() -> None:
    out = train.run(_args(seeds=[0], laser=False, steps=40, lr=3e-3, ema_decay=0.0),
                    log=lambda s: None)
    a = out["runs"][0]["arms"]["baseline"]
    assert a["loss_last"] < a["loss_first"] - 0.05
    assert "ema" not in a["eval"]


# ------------------------------------------------------------------------------ statistics
def test_welch_t_test_known_example() -> None:
    # mean 3 vs 6, variances 2.5 and 10 (n=5 each): t = -3/sqrt(2.5), df = 6.25 / 1.0625
    t, df, p = experiment.welch_t_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert t == pytest.approx(-3 / math.sqrt(2.5)) and df == pytest.approx(6.25 / 1.0625)
    assert 0.10 < p < 0.115  # R: t.test(1:5, 2*(1:5)) gives p-value = 0.1076
    assert experiment.welch_t_test([1, 1], [1, 1])[2] == 1.0
    assert experiment.welch_t_test([1, 1], [2, 2])[2] == 0.0


# -------------------------------------------------------------------------------- resume
def test_experiment_resumes_and_marks_partial(tmp_path) -> None:
    tasks = {"tiny": {**TINY, "steps": 2, "n_test": 8}}
    quiet = {"jobs": 0, "log": lambda s: None}
    first = experiment.run_experiment(tmp_path, tasks, [0], **quiet)
    assert (first["ran"], first["skipped"]) == (1, 0)
    again = experiment.run_experiment(tmp_path, tasks, [0], **quiet)
    assert (again["ran"], again["skipped"]) == (0, 1)
    assert len(experiment.load_runs(tmp_path / "trm_runs.jsonl")) == 1
    report = (tmp_path / "trm.md").read_text()
    assert "PARTIAL" not in report and "| laser | 1 |" in report
    commit = experiment.load_runs(tmp_path / "trm_runs.jsonl")[0]["commit"]
    assert commit is None or f"Code: commit {commit}." in report  # which code ran is recorded
    assert (tmp_path / "trm_accuracy_memory.png").stat().st_size > 0
    jsonl = tmp_path / "trm_runs.jsonl"
    jsonl.write_text(jsonl.read_text() * 2 + '{"torn line')  # a duplicate and a killed write
    experiment.write_report(tmp_path, tasks, [0])
    assert "| laser | 1 |" in (tmp_path / "trm.md").read_text(), "a duplicate counts once"
    experiment.write_report(tmp_path, tasks, [0, 1])
    assert "PARTIAL: 1 of 2 runs" in (tmp_path / "trm.md").read_text()


@given(st.integers(1, 50), st.integers(51, 400), st.floats(0.0, 1.0), st.floats(1e-5, 1e-1))
def test_property_cosine_schedule_warms_up_then_decays_to_its_floor(warmup, steps, lo, lr):
    args = argparse.Namespace(lr=lr, warmup=warmup, steps=steps, schedule="cosine",
                              min_lr_ratio=lo)
    lrs = [train._lr_at(s, args) for s in range(steps)]
    assert lrs[warmup - 1] == pytest.approx(lr)  # the peak, right after the warm-up
    rise, decay = lrs[:warmup], lrs[warmup - 1:]
    assert all(a <= b * (1 + 1e-12) for a, b in zip(rise, rise[1:], strict=False))
    assert all(a >= b * (1 - 1e-12) for a, b in zip(decay, decay[1:], strict=False))
    assert lrs[-1] == pytest.approx(lo * lr, rel=1e-9, abs=1e-15)
    constant = argparse.Namespace(**{**vars(args), "schedule": "constant"})
    assert train._lr_at(steps - 1, constant) == lr


@given(st.lists(st.floats(-1, 1), min_size=2, max_size=12), st.floats(-0.5, 0.5))
def test_property_paired_difference_brackets_the_mean_and_follows_a_shift(xs, shift):
    a = xs
    b = [x + shift + 0.01 * (i % 2) for i, x in enumerate(xs)]  # a shift plus a little noise
    m, lo, hi, p = experiment.paired_difference(a, b)
    assert lo <= m <= hi and 0.0 <= p <= 1.0
    assert m == pytest.approx(shift + 0.01 * (len(xs) // 2) / len(xs), abs=1e-9)
    # the paired test ignores the spread between seeds: only the differences matter
    assert experiment.paired_difference([x * 100 for x in a], [x * 100 + (y - x) for x, y in
                                        zip(a, b, strict=True)])[0] == pytest.approx(m, abs=1e-6)


def test_paired_difference_known_example_and_bad_input() -> None:
    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t = 3.464, df 2, p = 0.0742
    m, lo, hi, p = experiment.paired_difference([0, 0, 0], [1, 2, 3])
    assert m == pytest.approx(2.0)
    assert hi - m == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-9)
    assert p == pytest.approx(0.07417990022744853, rel=1e-6)
    with pytest.raises(laser_fx.ConfigError, match="equal-length"):
        experiment.paired_difference([1, 2], [1])


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_min_lr_ratio_outside_the_unit_interval_is_a_clear_error(ratio: float) -> None:
    with pytest.raises(laser_fx.ConfigError, match="--min-lr-ratio must be in"):
        train.run(_args(seeds=[0], schedule="cosine", min_lr_ratio=ratio), log=lambda s: None)


# ------------------------------------------------------------------ calibrated LASER arm
def test_target_cosine_options_reach_the_laser_arms_config() -> None:
    args = train.options(train.build_parser().parse_args(
        ["--target-cosine", "0.9995", "--recalibrate-every", "25"]))
    cfg = train._laser_config(args)
    assert (cfg.target_cosine, cfg.recalibrate_every, cfg.granularity) == (0.9995, 25, "block")
    assert train._laser_config(train.options()).target_cosine is None  # off unless asked


def test_experiment_options_become_part_of_each_runs_key(tmp_path) -> None:
    argv = ["--preset", "small", "--tasks", "sudoku", "--seeds", "1", "--target-cosine",
            "0.9995", "--grad-cycles", "2", "--out-dir", str(tmp_path), "--report-only"]
    assert experiment.main(argv) == 0
    report = (tmp_path / "trm.md").read_text()
    assert '"grad_cycles": 2' in report and '"target_cosine": 0.9995' in report
    assert "recalibrate_every" not in report  # an option not given stays out of the key


def test_compiled_arms_run_their_own_code() -> None:
    # --compile: each arm's model classes get their own code objects, so dynamo's marks on
    # one arm's frames (a region-mode arm's graph breaks in the recursion loop) stay its own
    defaults = vars(train.build_parser().parse_args([]))

    def full_args(**kw: object) -> argparse.Namespace:
        return argparse.Namespace(**{**defaults, **TINY, "ema_decay": 0.0, **kw})

    args = full_args(compile="aot_eager")
    data = (torch.zeros(TINY["batch"], 16, dtype=torch.long),
            torch.zeros(TINY["batch"], 16, dtype=torch.long))
    cfg = TRMConfig(vocab_size=6, seq_len=16, hidden_size=TINY["d"], num_heads=TINY["heads"],
                    n=TINY["n"], T=TINY["T"], mixer=TINY["mixer"])
    a, b = (train._Arm(name, TRM(cfg), args, 0, data) for name in ("baseline", "checkpoint"))
    for module_a, module_b in zip(a.model.modules(), b.model.modules(), strict=True):
        if type(module_a).__module__.startswith("examples"):
            assert type(module_a) is not type(module_b)
            assert type(module_a).forward.__code__ is not type(module_b).forward.__code__
            assert isinstance(module_a, type(module_b).__mro__[1])  # still the user's class
    eager = train._Arm("baseline", TRM(cfg), full_args(), 0, data)
    assert type(eager.model) is TRM  # without --compile nothing changes
