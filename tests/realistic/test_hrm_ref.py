"""An HRM-style two-level model: the levels are the sites, never the whole inner model.

Issue 14: HRM's ACT wrapper calls its inner model a second time under no_grad (the Q target),
which made the whole inner model the "block"; a compressed checkpoint re-attached the carry
the block detached ("backward through the graph a second time" on the next step); and the
published one-step gradient (one grad call per level) must be a NoSitesError that says why.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import laser_fx
from laser_fx import LaserConfig, NoSitesError

from ._helpers import assert_grads_equal, grads_of
from .hrm_ref import HRMCarry, HRMLossHead, make_hrm, make_hrm_batch

LEVELS = ["model.inner.H_level", "model.inner.L_level"]


def _setup(**overrides):
    head = make_hrm(**overrides)
    batch = make_hrm_batch(head.model.config)
    return head, batch, head.initial_carry(batch)


def test_auto_picks_the_two_levels_not_the_inner_model():
    head, batch, carry = _setup()
    sites = {s.name: s for s in laser_fx.find_sites(head, (carry, batch))}
    assert sites["model.inner"].grad_uses == 1 and sites["model.inner"].num_uses == 2
    grad_uses = [sites[n].grad_uses for n in LEVELS]
    assert grad_uses == [2, 4], grad_uses  # H: 2 cycles with grad; L: 2 per cycle
    assert sites["model.inner.L_level"].block is None  # the inner model is no block
    laser_fx.compress(head, example_inputs=(carry, batch))
    rep = laser_fx.report(head).to_dict()
    # the levels are the blocks; granularity "auto" checkpoints each per layer (its one
    # HRMBlock: the level's input injection outside it stores less than the level's inputs)
    assert sorted(rep["granularity"]) == LEVELS
    for level in LEVELS:
        g = rep["granularity"][level]
        assert (g["chosen"], g["units"]) == ("layer", [f"{level}.layers.0"]), g
        assert g["estimated_peak_bytes"]["layer"] == min(g["estimated_peak_bytes"].values())
    assert sorted(s["name"] for s in rep["sites"]) == [f"{n}.layers.0" for n in LEVELS]
    assert not any(isinstance(m, laser_fx.SiteWrapper)
                   for m in (head.model.inner, *(head.get_submodule(n) for n in LEVELS)))
    assert "once with grad" in rep["skipped"]["model.inner"]


@pytest.mark.parametrize("granularity", ["auto", "block"])
def test_one_level_by_name_is_accepted(granularity):
    head, batch, carry = _setup()
    laser_fx.compress(head, ["model.inner.L_level"], config=LaserConfig(granularity=granularity),
                      example_inputs=(carry, batch))
    rep = laser_fx.report(head)
    if granularity == "block":  # the named level itself is the wrapped unit
        assert isinstance(head.model.inner.L_level, laser_fx.SiteWrapper)
        assert [s["name"] for s in rep.sites] == ["model.inner.L_level"]
    else:  # the named level is the one block, checkpointed per layer as "auto" chose
        assert list(rep.granularity) == ["model.inner.L_level"]
        assert [s["name"] for s in rep.sites] == rep.granularity["model.inner.L_level"]["units"]
        assert isinstance(head.model.inner.L_level.layers[0], laser_fx.SiteWrapper)
    assert not any(isinstance(m, laser_fx.SiteWrapper) for m in head.model.inner.H_level.modules())


def test_detached_carry_stays_detached_over_two_training_steps():
    head, batch, carry = _setup()
    laser_fx.compress(head, example_inputs=(carry, batch))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    # without the detach, the second step raises "backward through the graph a second time"
    for step in range(2):
        carry, loss, _ = head(carry, make_hrm_batch(head.model.config, seed=step))
        assert isinstance(carry, HRMCarry)
        for t in (carry.inner_carry.z_H, carry.inner_carry.z_L):
            assert t.grad_fn is None and not t.requires_grad
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert laser_fx.report(head).to_dict()["totals"]["stored_bytes"] > 0


def test_two_steps_exact_at_energy_one():
    head, batch, carry = _setup()
    ref = copy.deepcopy(head)
    laser_fx.compress(head, config=LaserConfig(energy=1.0), example_inputs=(carry, batch))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, head)]
    carries = [carry, carry]
    for step in range(2):
        b = make_hrm_batch(head.model.config, seed=step)
        grads = []
        for i, model in enumerate((ref, head)):
            torch.manual_seed(step)
            carries[i], loss, _ = model(carries[i], b)
            loss.backward()
            grads.append(grads_of(model))
            opts[i].step()
            opts[i].zero_grad()
        assert_grads_equal(grads[1], grads[0])
        torch.testing.assert_close(carries[1].inner_carry.z_L, carries[0].inner_carry.z_L,
                                   rtol=1e-5, atol=1e-5)


def test_one_step_gradient_has_nothing_to_compress_and_says_why():
    head, batch, carry = _setup(grad_cycles=0)  # the published schedule
    sites = {s.name: s for s in laser_fx.find_sites(head, (carry, batch))}
    assert [sites[n].grad_uses for n in LEVELS] == [1, 1]
    with pytest.raises(NoSitesError) as info:
        laser_fx.compress(head, example_inputs=(carry, batch))
    msg = str(info.value)
    for name in LEVELS:
        assert name in msg
    assert re.search(r"runs? with grad once", msg), msg
    assert not laser_fx.is_compressed(head) and type(head) is HRMLossHead
