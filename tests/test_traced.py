"""The compressed checkpoint traced into a compiled graph (`laser_fx.ops.traced`).

Under ``torch.compile`` a grad-enabled call of a checkpointed block with tensor arguments
is an autograd.Function dynamo traces (the block in the graph, ``laser_fx::pack`` after it,
``laser_fx::rerun`` in backward): pinned here are ``fullgraph=True`` on a TRM, no graph
break, the gradients and call-site roles of the eager compressed model, records freed with
their graph, and the errors that keep gradients right (a parameter changed in place, a
block drawing random numbers outside a dropout module). Backend ``aot_eager``: it traces
the backward as inductor does, without a C++ build.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from traced_helpers import BACKEND, UserTRM, check_records_follow_their_graph
from traced_helpers import cumsum_loss as _loss
from traced_helpers import plain_grads as _grads

import laser_fx
from laser_fx import LaserConfig, LaserFxError, SiteWrapper
from laser_fx.ops import _compiled, traced
from laser_fx.testing.zoo import ZOO

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _trm(granularity: str = "block", **cfg):
    _, inputs = ZOO["trm_attn"](batch=4, d=32, seq=16)
    torch.manual_seed(0)
    model = UserTRM(d=32, seq=16, n=2, T=2)
    config = LaserConfig(granularity=granularity, compile_backend=BACKEND, **cfg)
    eager = laser_fx.compress(copy.deepcopy(model), config=config, example_inputs=inputs)
    comp = laser_fx.compress(copy.deepcopy(model), config=config, example_inputs=inputs)
    return model, inputs, eager, comp


def _wrappers(model: nn.Module) -> list[SiteWrapper]:
    return [m for m in model.modules() if isinstance(m, SiteWrapper)]


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_fullgraph_trm_gives_the_eager_gradients_and_roles(granularity):
    model, inputs, eager, comp = _trm(granularity)
    compiled = torch.compile(comp, backend=BACKEND, fullgraph=True)  # a graph break raises
    exact = _grads(model, model, inputs)
    for _ in range(3):  # cold trackers, then warm ones
        g_c, g_e = _grads(comp, compiled, inputs), _grads(eager, eager, inputs)
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6)
    assert float(torch.nn.functional.cosine_similarity(g_c, exact, dim=0)) > 0.99
    # the same call sites (TRM's z-line and y-line) made the same trackers, with the same bases
    for wc, we in zip(_wrappers(comp), _wrappers(eager), strict=True):
        assert wc.trackers.keys() == we.trackers.keys()
        assert len({k.partition("@")[2] for k in wc.trackers}) == 2, wc.trackers.keys()
        for k, t in wc.trackers.items():
            torch.testing.assert_close(t.basis, we.trackers[k].basis, rtol=1e-4, atol=1e-5)
        assert wc.stats.calls == we.stats.calls and wc.stats.stored_bytes > 0
        # the re-run ran as one compiled vjp graph (laser_fx.ops._rerun), not the fallback
        assert wc.__dict__.get("_joint") not in (None, False)
    assert not _compiled.RECORDS, "backward left records behind"


def test_no_graph_break_and_the_block_is_traced_not_called():
    _, inputs, _, comp = _trm()
    explained = torch._dynamo.explain(comp)(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes
           if n.op == "call_function"}
    assert any("autograd_function_apply" in o for o in ops), ops


def test_records_live_as_long_as_their_graph():
    _, inputs, _, comp = _trm()
    compiled = torch.compile(comp, backend=BACKEND)
    # the grad-enabled cycle: n + 1 calls of the block
    check_records_follow_their_graph(comp, compiled, inputs, 3)


def test_a_parameter_changed_in_place_before_backward_raises():
    _, inputs, _, comp = _trm()
    compiled = torch.compile(comp, backend=BACKEND)
    loss = _loss(compiled(*inputs))
    with torch.no_grad():
        next(comp.net.parameters()).mul_(2)
    # laser_fx's own check, or autograd's when the compiled graph saved the parameter too
    with pytest.raises((LaserFxError, RuntimeError), match="modified"):
        loss.backward()


def test_parameter_gradients_go_to_grad_once_per_call_and_autograd_grad_raises():
    model, inputs, eager, comp = _trm()
    compiled = torch.compile(comp, backend=BACKEND)
    # accumulation: two backwards add up, as with the plain model
    _loss(compiled(*inputs)).backward()
    _loss(compiled(*inputs)).backward()
    twice = torch.cat([p.grad.flatten() for p in comp.parameters()])
    torch.testing.assert_close(twice, 2 * _grads(eager, eager, inputs), rtol=1e-5, atol=1e-6)
    params = [p for p in comp.parameters() if p.requires_grad]
    with pytest.raises(LaserFxError, match="loss.backward"):
        torch.autograd.grad(_loss(compiled(*inputs)), params)


def test_a_parameter_hook_routes_gradients_through_autograd_and_runs_once():
    model, inputs, eager, comp = _trm()
    calls = []
    weight = next(comp.net.parameters())
    weight.register_hook(lambda g: calls.append(1) or g * 2)  # before compiling
    next(eager.net.parameters()).register_hook(lambda g: g * 2)
    compiled = torch.compile(comp, backend=BACKEND)
    params = [p for p in comp.parameters() if p.requires_grad]
    got = torch.autograd.grad(_loss(compiled(*inputs)), params)  # returned gradients
    assert len(calls) == 1  # on the summed gradient, not once per block call
    want = torch.autograd.grad(_loss(eager(*inputs)), [p for p in eager.parameters()])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _NoisyBlock(nn.Module):
    """Random numbers outside a dropout module: the re-run cannot replay the graph's."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(h)) * (1 + 0.1 * torch.rand_like(h))


class _Loop(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = self.block(x)
        return x


def test_a_block_drawing_random_numbers_raises_in_backward():
    x = torch.randn(8, 32, 16)
    model = laser_fx.compress(_Loop(_NoisyBlock()), sites=["block"],
                              config=LaserConfig(compile_backend=None), example_inputs=(x,))
    compiled = torch.compile(model, backend=BACKEND)
    with pytest.raises(LaserFxError, match="random"):
        _loss(compiled(x)).backward()


def test_a_channel_dropout_block_takes_the_opaque_path_and_replays_its_masks():
    # Dropout2d's masks are per channel: not what SeededDropout draws, so the call is opaque
    block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Dropout2d(0.3), nn.Tanh())
    x = torch.randn(2, 4, 8, 8)
    model = laser_fx.compress(_Loop(block), sites=["block"],
                              config=LaserConfig(energy=1.0, compile_backend=None),
                              example_inputs=(x,))
    wrapper = _wrappers(model)[0]
    assert not traced.traceable(wrapper, (x,), {})
    model.eval()
    assert traced.traceable(wrapper, (x,), {})  # dropout off: traced
    model.train()
    compiled = torch.compile(model, backend=BACKEND)
    torch.manual_seed(0)
    out = compiled(x)
    torch.manual_seed(0)
    ref = _Loop(block)(x)  # the same masks: the opaque call runs the block eagerly
    torch.testing.assert_close(out, ref)
    g = torch.autograd.grad(_loss(out), list(block.parameters()))  # opaque: autograd.grad works
    g_ref = torch.autograd.grad(_loss(ref), list(block.parameters()))
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_deep_copy_is_a_site_of_its_own():
    _, inputs, _, comp = _trm()
    twin = copy.deepcopy(comp)
    keys = {w.op_key for w in _wrappers(comp)} & {w.op_key for w in _wrappers(twin)}
    assert not keys
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    twin_eager = copy.deepcopy(twin)
    g_twin = _grads(twin, torch.compile(twin, backend=BACKEND), inputs)
    g_eager = _grads(twin_eager, twin_eager, inputs)  # the twin's weights, not the original's
    torch.testing.assert_close(g_twin, g_eager, rtol=1e-5, atol=1e-6)


def test_another_batch_size_recompiles_and_stays_right():
    model, inputs, eager, comp = _trm()
    compiled = torch.compile(comp, backend=BACKEND)
    for batch in (4, 6, 8):  # dynamo makes the batch dim dynamic on the second size
        tokens = torch.randint(0, 12, (batch, 16), generator=torch.Generator().manual_seed(batch))
        g_c, g_e = _grads(comp, compiled, (tokens,)), _grads(eager, eager, (tokens,))
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6)


def test_autocast_is_replayed_in_the_rerun():
    # the compiled graph runs with autocast folded into its ops; the re-run must replay the
    # autocast state the call was traced under (energy 1.0: then compiled == eager exactly)
    model, inputs, eager, comp = _trm(energy=1.0)
    compiled = torch.compile(comp, backend=BACKEND)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g_c = _grads(comp, compiled, inputs)
        g_e = _grads(eager, eager, inputs)
    torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6)


@settings(deadline=None, max_examples=25)
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 40), min_size=1, max_size=6),
       st.sampled_from([0.9, 0.999, 1.0]))
def test_a_borrowed_activation_is_never_kept(seed, rows, energy):
    # `compress(borrowed=True)` (what `pack` uses): the caller overwrites x once compress
    # returns, as a compiled graph may reuse its buffer; every record must decompress to
    # what a tracker that kept x intact gives (dense records included: few rows)
    from laser_fx.tracker import SubspaceTracker

    g = torch.Generator().manual_seed(seed)
    cfg = LaserConfig(energy=energy, min_numel=64)
    kept, borrowed = SubspaceTracker(16, cfg), SubspaceTracker(16, cfg)
    basis = torch.linalg.qr(torch.randn(16, 4, generator=g)).Q
    records = []
    for n in rows:
        x = torch.randn(n, 4, generator=g) @ basis.T + 0.01 * torch.randn(n, 16, generator=g)
        p_kept = kept.compress(x.clone())
        p_borrowed = borrowed.compress(x, borrowed=True)
        x.fill_(float("nan"))  # the buffer is reused
        records.append((p_kept, p_borrowed))
    for p_kept, p_borrowed in records:
        a, b = kept.decompress(p_kept), borrowed.decompress(p_borrowed)
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)



class _ReadsAnAttribute(nn.Module):
    """A block reading a tensor that requires grad through an attribute, not an argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.extra: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(h)) * self.extra


class _SetsTheAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _ReadsAnAttribute()
        self.scale = nn.Parameter(torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.block.extra = self.scale * 2
        for _ in range(3):
            x = self.block(x)
        return x


def test_an_undeclared_tensor_requiring_grad_raises_instead_of_losing_its_gradient():
    # the traced forward drops the gradient of a tensor the block reads from an attribute
    # (the compiled run gave `scale` a wrong gradient silently); the site's first re-run
    # checks the block's reads, as the eager checkpoint does
    x = torch.randn(8, 32, 16)
    model = laser_fx.compress(_SetsTheAttribute(), sites=["block"],
                              config=LaserConfig(compile_backend=BACKEND), example_inputs=(x,))
    with pytest.raises(LaserFxError, match="neither its inputs nor its parameters"):
        _loss(model(x)).backward()  # eager
    with pytest.raises(LaserFxError, match="neither its inputs nor its parameters"):
        _loss(torch.compile(model, backend=BACKEND)(x)).backward()


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, h: torch.Tensor, inject: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(h + inject))


class _FromData(nn.Module):
    """The first block call's inputs need no gradient (data, zeros); its parameters do."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _TwoInputs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros_like(x)
        for _ in range(3):
            h = self.block(h, x)
        return h


def test_a_call_whose_inputs_need_no_gradient_still_gives_its_parameter_gradients():
    # dynamo inlines such a Function's forward and dropped its ctx when the argument count
    # equalled forward's parameter count (two tensors here): an error under compile
    x = torch.randn(8, 32, 16)
    torch.manual_seed(0)
    model = _FromData()
    comp = laser_fx.compress(copy.deepcopy(model), sites=["block"],
                             config=LaserConfig(energy=1.0, compile_backend=BACKEND),
                             example_inputs=(x,))
    g_c = _grads(comp, torch.compile(comp, backend=BACKEND, fullgraph=True), (x,))
    torch.testing.assert_close(g_c, _grads(model, model, (x,)), rtol=1e-5, atol=1e-6)
