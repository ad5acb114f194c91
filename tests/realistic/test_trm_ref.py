"""A TRM written like the public reference, compressed with the call its training loop makes.

Issue 14, "Must show": compress(loss_head, example_inputs=(carry, batch)) in <= 2 s at D=64,
the model keeps its class and ``initial_carry``, two consecutive ACT steps are exact at
``energy=1.0``, the default config keeps <= 0.10x the activation memory with gradient cosine
>= 0.999, and the bf16 forward dtype compresses and trains.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

import laser_fx
from laser_fx import LaserConfig

from ._helpers import assert_grads_equal, cosine, grads_of
from .trm_ref import (
    TRM,
    ACTCarry,
    ACTLossHead,
    CastedLoop,
    CastedWeightLoop,
    make_batch,
    make_trm,
)


def _loss(out):
    return out[1]


def _setup(**overrides):
    head = make_trm(**overrides)
    cfg = head.model.config
    batch = make_batch(cfg, seed=0)
    return head, cfg, batch, head.initial_carry(batch)


def _data_dependent_halting(head: ACTLossHead, carry: ACTCarry, batch) -> None:
    """Give the Q head weights so that ``q_halt > 0`` for some sequences of ``batch`` and not
    for others (its bias is set between the sequences' logits)."""
    q_head = head.model.inner.q_head
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        q_head.weight.copy_(torch.randn(q_head.weight.shape, generator=g))
        q_head.bias.zero_()
        q_halt = head.model(carry, batch)[1]["q_halt_logits"].sort().values
        q_head.bias[0] = -q_halt[1:3].mean()  # batch of 4: the top two halt (unless exploring)


def test_compress_with_the_training_loop_call_is_fast_and_keeps_the_model():
    head, cfg, batch, carry = _setup(hidden_size=64)
    assert cfg.hidden_size == 64
    t0 = time.perf_counter()
    out = laser_fx.compress(head, example_inputs=(carry, batch))
    took = time.perf_counter() - t0
    assert took <= 2.0, f"compress took {took:.2f} s on the D=64 TRM (limit 2 s)"
    assert out is head and type(head) is ACTLossHead and type(head.model) is TRM
    # granularity "auto": the shared ReasoningModule is checkpointed per layer (its 2 blocks)
    layers = ["model.inner.L_level.layers.0", "model.inner.L_level.layers.1"]
    g = laser_fx.report(head).granularity["model.inner.L_level"]
    assert (g["chosen"], g["asked"], g["units"]) == ("layer", "auto", layers), g
    assert g["estimated_peak_bytes"]["layer"] == min(g["estimated_peak_bytes"].values())
    assert all(isinstance(head.get_submodule(n), laser_fx.SiteWrapper) for n in layers)
    # the reference training loop: carry = model.initial_carry(batch); model(carry, batch)
    carry = head.initial_carry(batch)
    assert isinstance(carry, ACTCarry)
    carry, loss, metrics, _, _ = head(carry, batch)
    loss.backward()
    assert isinstance(carry, ACTCarry) and carry.inner_carry.z_H.grad_fn is None
    assert int(metrics["steps"]) == cfg.batch_size
    assert head.model.inner.L_level.layers[0].self_attn.qkv_proj.weight.grad is not None
    names = [s["name"] for s in laser_fx.report(head).to_dict()["sites"]]
    assert names == layers, names


def test_find_sites_sees_the_reasoning_module_and_casted_linears():
    head, cfg, batch, carry = _setup()
    sites = {s.name: s for s in laser_fx.find_sites(head, (carry, batch))}
    top = sites["model.inner.L_level"]
    assert top.block is None and top.module_type == "ReasoningModule"
    assert top.num_uses == cfg.H_cycles * (cfg.L_cycles + 1)
    assert top.grad_uses == cfg.L_cycles + 1  # the first H_cycles-1 cycles run under no_grad
    qkv = sites["model.inner.L_level.layers.0.self_attn.qkv_proj"]
    assert qkv.block == "model.inner.L_level" and qkv.module_type == "CastedLinear"
    # a CastedLinear on its own (bf16: the weight argument is a cast, not the parameter)
    x = torch.randn(2, 8, 64)
    loop = laser_fx.find_sites(CastedLoop(), (x,))
    assert [(s.name, s.grad_uses, s.width) for s in loop] == [("step", 4, 64)]
    param = laser_fx.find_sites(CastedWeightLoop(), (x,))
    assert [(s.name, s.param, s.grad_uses) for s in param] == [("weight", "weight", 4)]


def test_casted_linear_loop_compresses_in_bf16_and_trains():
    torch.manual_seed(0)
    model = CastedLoop()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 16, 64)
    laser_fx.compress(model, config=LaserConfig(energy=1.0), example_inputs=(x,))
    assert isinstance(model.step, laser_fx.SiteWrapper)
    model(x).float().square().mean().backward()
    ref(x).float().square().mean().backward()
    assert model.step.weight.grad.dtype == torch.float32
    # bf16 forward: the recompute from the reconstruction rounds differently than the forward
    assert cosine(grads_of(model), grads_of(ref)) >= 0.999


def test_two_consecutive_act_steps_are_exact_at_energy_one():
    head, cfg, batch0, carry = _setup(halt_max_steps=3)
    _data_dependent_halting(head, carry, batch0)
    ref = copy.deepcopy(head)
    laser_fx.compress(head, config=LaserConfig(energy=1.0), example_inputs=(carry, batch0))
    batches = [batch0, make_batch(cfg, seed=1)]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95)) for m in (ref, head)]
    carries = [carry, carry]
    for step, batch in enumerate(batches):
        grads, losses = [], []
        for i, model in enumerate((ref, head)):
            torch.manual_seed(100 + step)  # the same ACT exploration draws in both
            carries[i], loss, _, _, _ = model(carries[i], batch)
            loss.backward()
            losses.append(loss.detach())
            grads.append(grads_of(model))
            opts[i].step()
            opts[i].zero_grad()
        torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
        assert_grads_equal(grads[1], grads[0])
        assert torch.equal(carries[1].halted, carries[0].halted)
        assert torch.equal(carries[1].steps, carries[0].steps)
        torch.testing.assert_close(carries[1].inner_carry.z_H, carries[0].inner_carry.z_H,
                                   rtol=1e-5, atol=1e-5)
        if step == 0:  # the halting decision depends on the data: some halt, some go on
            halted = int(carries[0].halted.sum())
            assert 0 < halted < cfg.batch_size, f"{halted} of {cfg.batch_size} halted"


def test_default_config_keeps_a_tenth_of_the_memory_at_gradient_cosine_0999():
    head, cfg, batch, carry = _setup()
    ref = copy.deepcopy(head)
    laser_fx.compress(head, example_inputs=(carry, batch))
    torch.manual_seed(1)
    base = laser_fx.measure_activation_memory(ref, (carry, batch), _loss)
    torch.manual_seed(1)
    comp = laser_fx.measure_activation_memory(head, (carry, batch), _loss)
    assert comp.loss == base.loss
    ratio = comp.ratio_to(base)
    assert ratio <= 0.10, (
        f"compressed TRM keeps {ratio:.3f}x of the uncompressed activation memory "
        f"({comp.after_forward} of {base.after_forward} bytes; limit 0.10x)")
    cos = cosine(grads_of(head), grads_of(ref))
    assert cos >= 0.999, f"gradient cosine vs uncompressed {cos:.5f} (limit 0.999)"


def test_bf16_forward_dtype_compresses_and_trains():
    head, cfg, batch, carry = _setup(forward_dtype="bfloat16")
    ref = copy.deepcopy(head)
    laser_fx.compress(head, example_inputs=(carry, batch))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    for model in (ref, head):
        torch.manual_seed(3)
        new_carry, loss, _, _, _ = model(carry, batch)
        loss.backward()
    assert new_carry.inner_carry.z_H.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in head.parameters())
    cos = cosine(grads_of(head), grads_of(ref))
    assert cos >= 0.99, f"bf16 gradient cosine vs uncompressed bf16 {cos:.5f} (limit 0.99)"
    before = head.model.inner.lm_head.weight.detach().clone()
    opt.step()
    opt.zero_grad()
    assert not torch.equal(before, head.model.inner.lm_head.weight)
    torch.manual_seed(4)
    _, loss, _, _, _ = head(new_carry, batch)  # a second step on warm trackers
    loss.backward()
    assert torch.isfinite(loss)


def test_eval_forward_and_state_dict_match_the_uncompressed_model():
    head, cfg, batch, carry = _setup()
    ref = copy.deepcopy(head)
    laser_fx.compress(head, example_inputs=(carry, batch))
    assert list(head.state_dict()) == list(ref.state_dict())
    head.eval()
    ref.eval()
    with torch.no_grad():
        c1, l1, *_ = head(carry, batch)
        c2, l2, *_ = ref(carry, batch)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    assert torch.equal(c1.inner_carry.z_H, c2.inner_carry.z_H)


def test_report_bytes_agree_with_measured_activation_memory():
    head, cfg, batch, carry = _setup()
    ref = copy.deepcopy(head)
    laser_fx.compress(head, example_inputs=(carry, batch))
    base = laser_fx.measure_activation_memory(ref, (carry, batch), _loss)
    comp = laser_fx.measure_activation_memory(head, (carry, batch), _loss)
    totals = laser_fx.report(head).to_dict()["totals"]
    claimed = totals["dense_bytes"] - totals["stored_bytes"]
    measured = base.after_forward - comp.after_forward
    assert abs(claimed / measured - 1) < 0.10, (
        f"the report says compression saves {claimed} bytes, measured {measured} "
        f"(uncompressed {base.after_forward}, compressed {comp.after_forward})")


# per grad-enabled layer call, the traced ops: one checkpoint; or one compressed linear per
# CastedLinear (qkv, o, gate_up, down), whose weight reaches F.linear through a cast
_TRACED_PER_CALL = {"checkpoint": 1, "linear": 4}


@pytest.mark.parametrize("mode", list(_TRACED_PER_CALL))
def test_compiled_act_steps_trace_the_keyword_calls_and_match_the_uncompressed_model(mode):
    # torch.compile of the reference training call: the reasoning module's layers are called
    # with keyword arguments (hidden_states=..., cos_sin=(cos, sin)), which the traced
    # checkpoint carries as a layout; halting on data, dataclass carries, casted weights
    from laser_fx.ops import _compiled

    torch._dynamo.reset()
    head, cfg, batch0, carry = _setup(halt_max_steps=3)
    _data_dependent_halting(head, carry, batch0)
    ref = copy.deepcopy(head)
    cfg_l = LaserConfig(mode=mode, energy=1.0, compile_backend="aot_eager")
    laser_fx.compress(head, config=cfg_l, example_inputs=(carry, batch0))
    runs = [torch.compile(m, backend="aot_eager") for m in (ref, head)]
    first_token = next(_compiled.TOKENS)
    carries = [carry, carry]
    for step, batch in enumerate([batch0, make_batch(cfg, seed=1)]):
        grads = []
        for i, (model, run) in enumerate(zip((ref, head), runs, strict=True)):
            torch.manual_seed(100 + step)  # the same ACT exploration draws in both
            carries[i], loss, _, _, _ = run(carries[i], batch)
            model.zero_grad(set_to_none=True)
            loss.backward()
            grads.append(grads_of(model))
        assert_grads_equal(grads[1], grads[0])
        assert torch.equal(carries[1].halted, carries[0].halted)
    traced_calls = next(_compiled.TOKENS) - first_token - 1
    grad_calls = 2 * (cfg.L_cycles + 1) * cfg.L_layers  # per step: the last H cycle, per layer
    assert traced_calls == grad_calls * _TRACED_PER_CALL[mode], (traced_calls, grad_calls)
    torch._dynamo.reset()
