"""Checkpoint granularity (`laser_fx.granularity`): block, layer or sublayer, chosen by peak."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import laser_fx
from laser_fx import ConfigError, LaserConfig
from laser_fx.granularity import levels, plan_granularity
from laser_fx.sites import Site, Use
from laser_fx.testing.zoo import ZOO

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _trm(batch: int = 8):
    return ZOO["trm_attn"](seed=0, batch=batch)


def _grads(model, inputs):
    model.zero_grad(set_to_none=True)
    model(*inputs).float().square().mean().backward()
    return [p.grad for p in model.parameters()]


class _TorchCheckpointed(nn.Module):
    """Exact torch checkpoint around every call of one module (what a user writes by hand)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return checkpoint(self.inner, *args, use_reentrant=False)


def _torch_at(model: nn.Module, paths: list[str]) -> nn.Module:
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, _TorchCheckpointed(owner.get_submodule(leaf)))
    return model


UNITS = {
    "block": ["net"],
    "layer": ["net.blocks.0", "net.blocks.1"],
    "sublayer": ["net.blocks.0.mix", "net.blocks.0.mlp", "net.blocks.1.mix", "net.blocks.1.mlp"],
}


def test_levels_of_the_trm_block_are_its_layers_and_their_branches():
    model, x = _trm()
    sites = laser_fx.find_sites(model, x)
    net = next(s for s in sites if s.name == "net")
    found = {lv.name: [u.name for u in lv.units] for lv in levels(net, sites)}
    assert found == UNITS
    for lv in levels(net, sites):
        assert lv.stored > 0 and lv.rerun > 0
    # finer units re-run less in backward and store more inputs
    by = {lv.name: lv for lv in levels(net, sites)}
    assert by["block"].rerun > by["layer"].rerun > by["sublayer"].rerun
    # (net(z, inj) keeps z and inj; its two layers keep z + inj and the first one's output)
    assert by["block"].stored <= by["layer"].stored < by["sublayer"].stored


@pytest.mark.parametrize("granularity", ["block", "layer", "sublayer", "auto"])
def test_every_granularity_is_exact_at_energy_one_and_wraps_its_units(granularity):
    model, x = _trm()
    ref = copy.deepcopy(model)
    laser_fx.compress(model, config=LaserConfig(energy=1.0, min_numel=0, granularity=granularity),
                      example_inputs=x)
    names = [s["name"] for s in laser_fx.report(model).to_dict()["sites"]]
    want = UNITS["layer"] if granularity == "auto" else UNITS[granularity]
    assert names == want
    for got, exp in zip(_grads(model, x), _grads(ref, x), strict=True):
        torch.testing.assert_close(got, exp, **TOL)
    assert list(model.state_dict()) == list(ref.state_dict())
    laser_fx.strip(model)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in ref.named_modules()]


def test_auto_picks_the_level_with_the_smallest_measured_peak_and_beats_torch_by_hand():
    model, x = _trm(batch=16)
    peaks, torch_peaks = {}, {}
    for level, paths in UNITS.items():
        m = copy.deepcopy(model)
        laser_fx.compress(m, config=LaserConfig(granularity=level), example_inputs=x)
        peaks[level] = laser_fx.measure_activation_memory(m, x).peak
        torch_peaks[level] = laser_fx.measure_activation_memory(
            _torch_at(copy.deepcopy(model), paths), x).peak
    auto = copy.deepcopy(model)
    laser_fx.compress(auto, example_inputs=x, config=LaserConfig(granularity="auto"))
    chosen = laser_fx.report(auto).granularity["net"]["chosen"]
    auto_peak = laser_fx.measure_activation_memory(auto, x).peak
    assert peaks[chosen] == min(peaks.values()), (chosen, peaks)
    assert auto_peak <= min(torch_peaks.values()) * 1.02, (auto_peak, torch_peaks)


def test_a_block_without_layers_stays_one_unit_and_the_report_says_what_was_chosen():
    model, x = ZOO["unrolled_rnn"](seed=0, batch=4)  # the cell calls two nn.Linear: its layers
    laser_fx.compress(model, config=LaserConfig(granularity="sublayer"), example_inputs=x)
    report = laser_fx.report(model)
    g = report.granularity["cell"]
    assert g["asked"] == "sublayer" and g["chosen"] in ("block", "layer")
    assert "checkpointed per" in str(report) and "estimated peak" in str(report)


def _site(name, parent, nbytes, input_bytes, calls=2):
    uses = tuple(Use(step=i, node=f"{name}@{i}", grad_enabled=True, call_index=i,
                     nbytes=nbytes, input_bytes=input_bytes) for i in range(calls))
    return Site(name, "module", 8, uses, parent=parent, block=None if parent is None else "b")


@given(st.integers(1, 10**6), st.integers(1, 10**6), st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=4))
def test_property_auto_takes_the_smallest_estimate_and_the_estimates_add_up(bin_, bsaved, layers):
    block = _site("b", None, bsaved + sum(s for s, _ in layers), bin_)
    units = [_site(f"b.l{i}", "b", s, i_b) for i, (s, i_b) in enumerate(layers)]
    chosen, options = plan_granularity(block, [block, *units], "auto")
    assert chosen.peak == min(lv.peak for lv in options)
    by = {lv.name: lv for lv in options}
    assert by["block"].stored == 2 * bin_ and by["block"].rerun == block.uses[0].nbytes
    # the layer level keeps its inputs plus what the block saves outside its layers
    assert by["layer"].stored == 2 * sum(i for _, i in layers) + 2 * bsaved
    assert by["layer"].rerun == max(s for s, _ in layers)


def test_bad_granularity_is_a_config_error():
    with pytest.raises(ConfigError, match="granularity"):
        LaserConfig(granularity="per-op")


def test_a_unit_named_explicitly_is_reported_compressed_not_left_alone():
    # regression: naming a block and a module inside it, with that module one of the units,
    # listed it both as compressed and as "left alone: covered by block"
    model, x = _trm()
    laser_fx.compress(model, ["net", "net.blocks.0.mlp"],
                      config=LaserConfig(granularity="sublayer"), example_inputs=x)
    report = laser_fx.report(model)
    assert [s["name"] for s in report.sites] == UNITS["sublayer"]
    assert report.skipped == {}


def test_the_record_says_what_was_chosen_at_every_granularity():
    for granularity, chosen in (("block", "block"), ("layer", "layer"), ("auto", "layer")):
        model, x = _trm()
        laser_fx.compress(model, config=LaserConfig(granularity=granularity), example_inputs=x)
        record = laser_fx.report(model).granularity["net"]
        assert (record["asked"], record["chosen"]) == (granularity, chosen)
        assert set(record["estimated_peak_bytes"]) == {"block", "layer", "sublayer"}
