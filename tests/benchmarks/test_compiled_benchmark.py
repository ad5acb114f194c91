"""benchmarks/compiled.py: the script end to end on a tiny TRM (D=16, n=1, T=1, batch 2) with
backend "aot_eager" (eager, compiled uncompressed and compiled laser_fx default, one measured
step), and its memory method (profiler allocation events) against
`laser_fx.measure_activation_memory` on eager models. Step times are not checked (shared box)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import laser_fx
from benchmarks import compiled
from benchmarks._common import Workload
from laser_fx.testing import own_code


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "compiled.md"
    torch._dynamo.reset()
    try:
        # unc last: the last configuration compiled keeps its code (no recompile)
        records = compiled.main(["--d", "16", "--n", "1", "--T", "1", "--batch", "2",
                                 "--steps", "1", "--warmup", "1", "--backend", "aot_eager",
                                 "--configs", "eager", "laser", "unc", "--explain",
                                 "--out", str(out)])
    finally:
        torch._dynamo.reset()
    return records, out


def test_table_has_the_columns_and_sane_values(run):
    records, out = run
    (rec,) = records
    rows = {r["key"]: r for r in rec["rows"]}
    assert list(rows) == ["eager", "laser", "unc"] and rec["complete"], rec
    for r in rows.values():
        assert "error" not in r, r
        assert r["step_ms"] > 0 and r["q25_ms"] <= r["step_ms"] <= r["q75_ms"], r
        assert 0 < r["after_forward_bytes"] <= r["peak_bytes"], r
        assert 0.0 <= r["compiled_share"] <= 1.0, r
    # same weights, same batch: compiled uncompressed is the eager model's gradient
    assert rows["unc"]["grad_cosine"] > 0.9999, rows["unc"]
    assert rows["laser"]["grad_cosine"] > 0.99, rows["laser"]
    # laser keeps compressed block inputs only; compiled uncompressed keeps every activation
    assert rows["laser"]["after_forward_bytes_x_unc"] < 0.5, rows["laser"]
    assert rows["unc"]["first_step_s_x_unc"] == 1.0 and "first_step_s_x_unc" not in rows["eager"]
    # aot_eager runs the whole uncompressed step in one AOT graph; eager runs none
    assert rows["unc"]["compiled_share"] > 0.5 and rows["eager"]["compiled_share"] == 0.0
    assert (rows["unc"]["graph_breaks"], rows["unc"]["graphs"]) == (0, 1), rows["unc"]
    assert rows["unc"]["graphs_compiled_timed"] == 0, rows["unc"]
    table = compiled.markdown_table(rec["rows"])
    assert table.splitlines()[0] == "| " + " | ".join(compiled.COLUMNS) + " |"
    assert table in out.read_text() and "aot_eager" in out.read_text()
    (saved,) = [json.loads(ln) for ln in out.with_suffix(".jsonl").read_text().splitlines()]
    assert saved["rows"] == json.loads(json.dumps(rec["rows"]))


def test_options_are_checked():
    with pytest.raises(SystemExit):
        compiled.main(["--warmup", "0"])  # the first round recompiles: it cannot be timed


def test_frontier_compiled_flag_runs_this_script_with_its_options(monkeypatch):
    from benchmarks import frontier

    seen = []
    monkeypatch.setattr(compiled, "main", lambda argv: seen.append(argv) or ["ran"])
    assert frontier.main(["--compiled", "--d", "16", "--explain"]) == ["ran"]
    assert seen == [["--d", "16", "--explain"]]


@settings(max_examples=6)  # a profiler session costs ~0.25 s
@given(batch=st.integers(1, 6), width=st.integers(2, 24), depth=st.integers(1, 3))
def test_profiled_memory_equals_the_dispatch_count_on_eager_models(batch, width, depth):
    # No storage outside the dispatcher (no RNG state, no compiled buffers): the profiler's
    # allocation events and measure_activation_memory see the same bytes, up to the loss.
    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())))
    x = torch.randn(batch, width)
    w = Workload(name="mlp", model=model, inputs=(x,), kwargs={},
                 loss_fn=lambda out, target: (out - target).square().mean(),
                 target=torch.zeros(batch, width), shared_path="")
    ref = laser_fx.measure_activation_memory(model, (x,), w.loss)
    c = compiled._Config("eager", model, model, None)
    after, peak = compiled.profiled_memory(w, c)
    assert abs(after - ref.after_forward) <= 16 and abs(peak - ref.peak) <= 16, (after, peak, ref)


class _Loop(nn.Module):
    """A loop over a linear layer; ``brk``: a graph break inside the loop (as region mode's
    opaque block calls inside TRM's recursion), which makes dynamo skip the frame."""

    def __init__(self, brk: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.brk = brk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = self.lin(x)
            if self.brk:
                torch._dynamo.graph_break()
        return x


def _linear_frames(call, x) -> int:
    """Python frames of ``nn.Linear.forward`` one call runs: 0 when dynamo compiled the loop
    into one graph (the layer inlined), 3 when it skipped the loop's frame."""
    import sys

    seen = [0]

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is nn.Linear.forward.__code__:
            seen[0] += 1

    sys.setprofile(profile)
    try:
        call(x)
    finally:
        sys.setprofile(None)
    return seen[0]


@pytest.mark.parametrize("isolated", [False, True])
def test_own_code_keeps_another_models_skipped_frames_away(fresh_dynamo, isolated):
    x = torch.randn(2, 4)
    keep, breaker = _Loop(brk=False), _Loop(brk=True)
    if isolated:
        own_code(keep), own_code(breaker)
    run_keep = torch.compile(keep, backend="eager")
    run_keep(x)
    assert _linear_frames(run_keep, x) == 0  # compiled whole
    torch.compile(breaker, backend="eager")(x)  # dynamo gives up on its loop's frame
    # without own_code the mark lands on the shared code object, and the first model, whose
    # compiled code is intact, runs its loop eagerly from then on
    assert _linear_frames(run_keep, x) == (0 if isolated else 3)
    torch.testing.assert_close(run_keep(x), keep.lin(keep.lin(keep.lin(x))))


def test_own_code_changes_code_objects_not_behaviour():
    from examples.trm.model import TRM, TRMConfig

    torch.manual_seed(0)
    model = TRM(TRMConfig(vocab_size=6, seq_len=8, hidden_size=16, num_heads=2, n=2, T=2))
    ref = copy.deepcopy(model)
    own_code(model)
    for (name, mod), (_, orig) in zip(model.named_modules(), ref.named_modules(), strict=True):
        assert isinstance(mod, type(orig)), name
        if type(orig).__module__.startswith("examples"):
            assert type(mod) is not type(orig) and type(mod).__name__ == type(orig).__name__
            assert type(mod).forward.__code__ is not type(orig).forward.__code__, name
        else:  # torch's own modules stay as they are
            assert type(mod) is type(orig), name
    assert model.state_dict().keys() == ref.state_dict().keys()
    tokens = torch.randint(0, 6, (2, 8))
    y, z = ref.initial_carry(2)
    for a, b in zip(model(tokens, y, z), ref(tokens, y, z), strict=True):
        assert torch.equal(a, b)


def test_lr_steps_every_configuration_after_every_step_and_compares_the_first(
        monkeypatch, tmp_path, fresh_dynamo):
    steps = []
    real_step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        steps.append(id(self))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    out = tmp_path / "lr.md"
    (rec,) = compiled.main(["--d", "16", "--n", "1", "--T", "1", "--batch", "2", "--steps", "2",
                            "--warmup", "1", "--backend", "aot_eager", "--configs", "eager",
                            "unc", "--lr", "0.1", "--out", str(out)])
    # one optimizer per configuration, stepped after the cold step and every interleaved one
    assert len(set(steps)) == 2 and len(steps) == 2 * (1 + 1 + 2)
    assert rec["lr"] == 0.1 and "AdamW lr 0.1 after every step" in out.read_text()
    for row in rec["rows"]:  # the cold step ran on the reference's weights
        assert row["grad_cosine"] == pytest.approx(1.0, abs=1e-6), row
