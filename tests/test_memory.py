"""Tests of `laser_fx.measure_activation_memory`: the bytes are what autograd really keeps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import laser_fx
from laser_fx import ConfigError, measure_activation_memory
from laser_fx.testing.zoo import ZOO

F32 = 4


def _mlp(d_in: int, d: int, d_out: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Linear(d, d_out))


class _Wrap(nn.Module):
    """Runs ``inner`` inside ``how`` (checkpoint, no_grad, pack hooks)."""

    def __init__(self, inner: nn.Module, how):
        super().__init__()
        self.inner, self.how = inner, how

    def forward(self, x):
        return self.how(self.inner, x)


@settings(max_examples=10)
@given(n=st.integers(1, 24), d=st.integers(1, 24))
def test_linear_relu_linear_keeps_one_hidden_tensor(n, d):
    # addmm saves its input x (an input: not counted) and the weights (parameters: not
    # counted); ReLU saves its output, which is also the second linear's saved input.
    model = _mlp(5, d, 3)
    x = torch.randn(n, 5)
    mem = measure_activation_memory(model, (x,))
    assert mem.after_forward == n * d * F32
    assert mem.peak >= mem.after_forward
    with torch.no_grad():
        assert mem.loss == pytest.approx(model(x).sum().item(), rel=1e-5)


def test_checkpoint_keeps_nothing_and_no_grad_keeps_nothing():
    model, x = _mlp(8, 32, 4), torch.randn(16, 8)
    base = measure_activation_memory(model, x)
    ckpt = measure_activation_memory(
        _Wrap(model, lambda m, x: checkpoint(m, x, use_reentrant=False)), x
    )
    assert base.after_forward == 16 * 32 * F32
    # non-reentrant checkpoint keeps only its input, the model input: nothing new
    assert ckpt.after_forward == 0
    assert ckpt.peak >= base.after_forward, "backward recomputes the hidden tensor"

    def no_grad(m, x):
        with torch.no_grad():
            return m(x)

    ng = measure_activation_memory(_Wrap(model, no_grad), x)
    assert ng.after_forward == 0
    assert ng.peak >= 16 * 32 * F32  # the forward still made its temporaries


def test_parameters_inputs_and_their_views_are_not_counted():
    class ViewsOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 6))
            self.v = nn.Parameter(torch.randn(6))

        def forward(self, x):
            # mm saves x (input) and w.t() (a view of a parameter); mul saves x and the
            # expanded parameter (a view): nothing new is kept
            return (x @ self.w.t()).sum() + (x * self.v.expand(x.shape[0], 6)).sum()

    x = torch.randn(10, 6, requires_grad=True)
    mem = measure_activation_memory(ViewsOnly(), (x,))
    assert mem.after_forward == 0
    assert mem.peak > 0  # the gradients made in backward are counted in the peak


def test_tensor_freed_during_forward_is_not_counted_after_it():
    class Temp(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8))

        def forward(self, x):
            h = (x.repeat(64, 1) + 1.0).sum(0)  # two big temporaries, freed at once
            return (h * self.w).sum()  # mul saves h: 8 floats

    x = torch.randn(4, 8)
    mem = measure_activation_memory(Temp(), (x,))
    assert mem.after_forward == 8 * F32
    assert mem.peak >= 64 * 4 * 8 * F32


def test_storages_made_in_pack_hooks_are_counted():
    # What a compression mechanism stores is created inside saved-tensor pack hooks; pack
    # hooks stack, so only allocation tracking sees it.
    n, d = 12, 16
    model = _mlp(5, d, 3)

    def pack(t):
        return t.to(torch.float64) if t.shape == (n, d) else t

    def unpack(t):
        return t.to(torch.float32) if t.shape == (n, d) else t

    def hooked(m, x):
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return m(x)

    x = torch.randn(n, 5)
    mem = measure_activation_memory(_Wrap(model, hooked), x)
    # ReLU and the second linear each save the hidden tensor: two float64 copies, and the
    # float32 original is freed
    assert mem.after_forward == 2 * n * d * 8


def test_custom_function_saving_a_new_tensor_is_counted():
    class SaveSquare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            sq = x * x
            ctx.save_for_backward(sq)
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            (sq,) = ctx.saved_tensors
            return g * sq

    x = torch.randn(7, 3, requires_grad=True)
    mem = measure_activation_memory(lambda t: SaveSquare.apply(t), x, loss_fn=lambda out: out)
    assert mem.after_forward == 7 * 3 * F32


def test_backward_false_measures_the_forward_only():
    model, x = _mlp(8, 16, 4), torch.randn(4, 8)
    mem = measure_activation_memory(model, x, backward=False)
    assert mem.after_forward == 4 * 16 * F32
    assert all(p.grad is None for p in model.parameters())
    measure_activation_memory(model, x)
    assert all(p.grad is not None for p in model.parameters())


def test_agrees_with_torch_profiler():
    from torch.profiler import ProfilerActivity, profile

    model, x = _mlp(32, 128, 16), torch.randn(64, 32)
    mem = measure_activation_memory(model, x, backward=False)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(x).sum()
    # bytes allocated and not freed during the forward, minus the loss scalar
    net = sum(e.self_cpu_memory_usage for e in prof.events()) - loss.numel() * F32
    if net <= 0:
        pytest.skip("this torch build's profiler records no CPU memory events")
    assert abs(mem.after_forward - net) <= 0.1 * net, (mem.after_forward, net)


def test_traced_model_keeps_what_the_model_keeps_and_compression_keeps_less():
    model, x = ZOO["trm_mlp_t"](d=16, seq=8, n=2, T=2, expansion=2, batch=4)
    base = measure_activation_memory(model, x)
    traced = measure_activation_memory(laser_fx.trace(model), x)
    assert traced.after_forward == base.after_forward
    cmodel = laser_fx.compress(model, example_inputs=x)
    comp = measure_activation_memory(cmodel, x)
    assert comp.loss == pytest.approx(base.loss, rel=1e-4, abs=1e-4)
    assert 0 < comp.after_forward < base.after_forward
    assert comp.ratio_to(base) == comp.after_forward / base.after_forward < 1.0
    assert comp.peak >= comp.after_forward


class _KwModel(nn.Module):
    """``forward(x, *, mask=None)``: the keyword input changes what is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.relu(self.lin(x))
        return h if mask is None else h * mask


def test_keyword_inputs_reach_the_model():
    model, x = _KwModel(), torch.randn(6, 4)
    mask = torch.rand(6, 8)
    plain = measure_activation_memory(model, (x,))
    masked = measure_activation_memory(model, (x,), kwargs={"mask": mask})
    assert plain.after_forward == 6 * 8 * F32  # relu's output
    # mul saves relu's output (already counted) and the mask (an input: not counted)
    assert masked.after_forward == plain.after_forward
    with torch.no_grad():
        assert masked.loss == pytest.approx(float((model(x) * mask).sum()), rel=1e-5)
        assert masked.loss != pytest.approx(plain.loss)


_ERRORS = [
    pytest.param(dict(loss_fn=lambda out: out), "must return a scalar tensor.*shape",
                 id="non-scalar"),
    pytest.param(dict(loss_fn=lambda out: 3.0), "must return a scalar tensor.*float",
                 id="non-tensor"),
    pytest.param(dict(loss_fn=lambda out: out.no_such_attribute),
                 "`loss_fn` raised AttributeError on the model's output", id="loss-fn-raises"),
    pytest.param(dict(loss_fn="sum"), "`loss_fn` must be callable", id="loss-fn-not-callable"),
    pytest.param(dict(model=3), "`model` must be callable", id="model-not-callable"),
    pytest.param(dict(inputs={"x": 1}), "`inputs` must be a tensor or a tuple", id="inputs-dict"),
    pytest.param(dict(model=lambda x: (x > 0)), "no floating-point tensor", id="no-float-output"),
]


@pytest.mark.parametrize("override, match", _ERRORS)
def test_errors_are_config_errors(override, match):
    kwargs = dict(model=_mlp(4, 8, 2), inputs=(torch.randn(3, 4),), loss_fn=None)
    kwargs.update(override)
    with pytest.raises(ConfigError, match=match):
        measure_activation_memory(kwargs["model"], kwargs["inputs"], kwargs["loss_fn"])
