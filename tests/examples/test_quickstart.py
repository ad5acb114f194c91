"""The README's quick start (examples/quickstart.py) runs and saves what it says it saves."""

from __future__ import annotations

import copy
import math

import torch

import laser_fx
from examples.quickstart import HaltingModel, main


def test_quickstart_runs_and_keeps_a_fraction_of_the_memory(capsys):
    out = main(["--steps", "3", "--batch", "8", "--seq", "16"])
    assert out["memory_ratio"] < 0.25, out  # the block's calls keep only packed inputs
    assert math.isfinite(out["loss"])
    assert "block  checkpoint" in capsys.readouterr().out


def test_quickstart_model_is_exact_at_energy_one_across_carried_calls():
    torch.manual_seed(0)
    model = HaltingModel(d=16, max_steps=3)
    ref = copy.deepcopy(model)
    tokens = torch.randint(0, 16, (4, 8))
    carry = model.initial_carry(tokens)
    laser_fx.compress(model, config=laser_fx.LaserConfig(energy=1.0, min_numel=0),
                      example_inputs=(carry, tokens))
    c1, c2 = carry, carry
    for _ in range(2):  # the carry of one call feeds the next, detached
        c1, a = model(c1, tokens)
        c2, b = ref(c2, tokens)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        a.square().mean().backward()
        b.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
