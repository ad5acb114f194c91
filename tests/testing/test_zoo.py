"""Tests of the model zoo: determinism, shapes, and the recursion structure each model claims."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from laser_fx.testing.zoo import (
    NEGATIVE,
    TRACEABLE,
    WEIGHT_SHARED,
    ZOO,
    TRMLike,
    make_inputs,
    swiglu_hidden,
)

OUT_SHAPES = {
    "trm_attn": (2, 16, 12),
    "trm_mlp_t": (2, 16, 12),
    "looped_transformer": (2, 8, 64),
    "unrolled_rnn": (2, 6, 8),
    "recursive_conv": (2, 3, 8, 8),
    "grad_modes": (2, 16),
    "plain_mlp": (2, 4),
    "data_dependent_loop": (2, 16),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: with 2 intra-op threads on a shared, loaded 2-core machine,
    # OpenMP spin-waiting made each op ~50x slower (measured); one thread avoids that.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registry_names_are_consistent():
    assert set(OUT_SHAPES) == set(ZOO)
    assert set(WEIGHT_SHARED) <= set(TRACEABLE) <= set(ZOO)
    assert set(NEGATIVE) == set(ZOO) - set(WEIGHT_SHARED)


@pytest.mark.parametrize("name", list(ZOO))
def test_factory_is_deterministic_and_keeps_global_rng(name):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    m1, x1 = ZOO[name]()
    assert torch.equal(torch.get_rng_state(), state), "building a model consumed global RNG"
    m2, x2 = ZOO[name]()
    m3, _ = ZOO[name](seed=1)
    for a, b in zip(x1, x2, strict=True):
        assert torch.equal(a, b)
    p1, p2, p3 = (torch.cat([p.flatten() for p in m.parameters()]) for m in (m1, m2, m3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)
    out = m1(*x1)
    assert tuple(out.shape) == OUT_SHAPES[name]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(m2(*x2), out)


@pytest.mark.parametrize("batch", [1, 3])
def test_make_inputs_batch(batch):
    model, _ = ZOO["looped_transformer"]()
    (x,) = make_inputs(model, batch=batch, seed=4)
    assert x.shape == (batch, 8, 64)
    assert torch.equal(x, make_inputs(model, batch=batch, seed=4)[0])
    with pytest.raises(TypeError, match="not a laser_fx.testing.zoo model"):
        make_inputs(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("width", "expansion", "hidden"),
    [
        pytest.param(64, 4, 192, id="trm-d64"),
        pytest.param(128, 4, 384, id="trm-d128"),
        pytest.param(16, 4, 64, id="seq16"),
        pytest.param(8, 2, 64, id="tiny-floor"),
    ],
)
def test_swiglu_hidden_table(width, expansion, hidden):
    assert swiglu_hidden(width, expansion) == hidden


@given(width=st.integers(1, 2048), expansion=st.sampled_from([1, 2, 2.5, 4, 8]))
def test_swiglu_hidden_property(width, expansion):
    h = swiglu_hidden(width, expansion)
    base = round(expansion * width * 2 / 3)
    assert h % 64 == 0 and h >= base and (h - base < 64 or h == 64)


def _count_calls(model: nn.Module, module: nn.Module, inputs: tuple) -> Counter:
    """Calls of ``module`` during a forward, keyed by the grad mode they ran under."""
    calls: Counter = Counter()
    handle = module.register_forward_pre_hook(
        lambda *_: calls.update([torch.is_grad_enabled()])
    )
    try:
        model(*inputs)
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("mixer", ["attn", "mlp_t"])
@pytest.mark.parametrize(("n", "T"), [(3, 2), (1, 1), (2, 3)], ids=["n3T2", "n1T1", "n2T3"])
def test_trm_applies_net_n_plus_1_times_per_cycle(mixer, n, T):
    model, inputs = ZOO[f"trm_{mixer}"](d=32, seq=8, n=n, T=T)
    calls = _count_calls(model, model.net.blocks[0].mlp.gate, inputs)
    assert calls == Counter({True: n + 1, False: (T - 1) * (n + 1)}) - Counter()
    assert model.net.blocks[1].mlp.gate.out_features == swiglu_hidden(32, 4)
    linears = [m for m in model.net.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.bias is None for m in linears)


def test_trm_rejects_bad_config():
    with pytest.raises(ValueError, match="`mixer` must be"):
        TRMLike(mixer="conv")
    with pytest.raises(ValueError, match="divisible by `heads`"):
        TRMLike(d=30, heads=4)


@pytest.mark.parametrize(
    ("name", "attr", "uses"),
    [
        pytest.param("looped_transformer", "layers.0.fc1", 4, id="looped-transformer"),
        pytest.param("unrolled_rnn", "cell.hid", 6, id="rnn"),
        pytest.param("recursive_conv", "block.conv1", 3, id="conv"),
        pytest.param("plain_mlp", "fc2", 1, id="plain-mlp"),
    ],
)
def test_loop_counts(name, attr, uses):
    model, inputs = ZOO[name]()
    assert sum(_count_calls(model, model.get_submodule(attr), inputs).values()) == uses


def test_data_dependent_loop_step_count_depends_on_values():
    model, _ = ZOO["data_dependent_loop"]()
    counts = {
        sum(_count_calls(model, model.body, (torch.full((2, 16), v),)).values())
        for v in (-3.0, 3.0)
    }
    assert len(counts) == 2, "the loop should stop at different steps for different inputs"


def test_grad_modes_model_uses_both_modes():
    model, inputs = ZOO["grad_modes"]()
    calls = _count_calls(model, model.lin, inputs)
    # lin(x), enable_grad region, lin(tanh(h)) with grad; decorators, ctx, plain call without
    assert calls == Counter({True: 3, False: 6})
    assert torch.is_grad_enabled()
