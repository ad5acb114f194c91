"""Mechanism ``"linear"`` traced into a compiled graph (`laser_fx.ops.traced_linear`).

Under ``torch.compile`` each linear op of a block call that applies one of the block's
parameters (directly, through a cast, or as ``x @ W``) is an autograd.Function dynamo traces:
``F.linear`` in the graph, ``laser_fx::pack_linear`` storing the input, and
``laser_fx::linear_grad_weight`` in backward. Pinned here: ``fullgraph=True`` (no graph
break, dropout included: nothing is re-run), the gradients, trackers and call-site roles of
the eager compressed model, the uncompressed model's gradients and dropout masks at energy
1.0, autocast, and records freed with their graph. Backend ``aot_eager``: it traces the
backward as inductor does, without a C++ build.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from traced_helpers import BACKEND, UserTRM, check_records_follow_their_graph, plain_grads

import laser_fx
from laser_fx import LaserConfig, SiteWrapper
from laser_fx.ops import _compiled
from laser_fx.testing.zoo import ZOO

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _grads(model: nn.Module, run, inputs, seed: int = 0) -> torch.Tensor:
    return plain_grads(model, run, inputs, seed)


def _wrappers(model: nn.Module) -> list[SiteWrapper]:
    return [m for m in model.modules() if isinstance(m, SiteWrapper)]


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_fullgraph_trm_gives_the_eager_gradients_trackers_and_roles(granularity):
    _, inputs = ZOO["trm_attn"](batch=4, d=32, seq=16)
    torch.manual_seed(0)
    model = UserTRM(d=32, seq=16, n=2, T=2)
    config = LaserConfig(mode="linear", granularity=granularity)
    eager = laser_fx.compress(copy.deepcopy(model), config=config, example_inputs=inputs)
    comp = laser_fx.compress(copy.deepcopy(model), config=config, example_inputs=inputs)
    compiled = torch.compile(comp, backend=BACKEND, fullgraph=True)  # a graph break raises
    exact = _grads(model, model, inputs)
    for _ in range(3):  # cold trackers, then warm ones
        g_c, g_e = _grads(comp, compiled, inputs), _grads(eager, eager, inputs)
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6)
    assert float(F.cosine_similarity(g_c, exact, dim=0)) > 0.99
    compressed = 0
    for wc, we in zip(_wrappers(comp), _wrappers(eager), strict=True):
        assert wc.trackers.keys() == we.trackers.keys()
        assert len({k.partition("@")[2] for k in wc.trackers}) == 2, wc.trackers.keys()
        for k, t in wc.trackers.items():
            torch.testing.assert_close(t.basis, we.trackers[k].basis, rtol=1e-4, atol=1e-5)
        assert wc.stats.calls == we.stats.calls and wc.stats.packed == we.stats.packed
        compressed += wc.stats.stored_bytes < wc.stats.dense_bytes
    assert compressed, "no site stored its linear inputs compressed"
    assert not _compiled.RECORDS, "backward left records behind"


class _CastDropBlock(nn.Module):
    """What a linear-mode block meets: a cast weight (CastedLinear), a raw parameter applied
    as ``x @ W``, a parameter-free op between them, and dropout in training mode."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.w_down = nn.Parameter(torch.randn(2 * d, d) / (2 * d) ** 0.5)
        self.drop = nn.Dropout(0.25)

    def forward(self, h: torch.Tensor, inject: torch.Tensor) -> torch.Tensor:
        a = F.linear(h + inject, self.up.weight.to(h.dtype), self.up.bias.to(h.dtype))
        return h + self.drop(F.gelu(a) @ self.w_down)


def _low_rank(*shape: int, rank: int = 3) -> torch.Tensor:
    """Inputs of a few directions (what recursive models' latents are): compressible."""
    return torch.randn(*shape[:-1], rank) @ torch.randn(rank, shape[-1])


class _Refiner(nn.Module):
    def __init__(self, steps: int = 4) -> None:
        super().__init__()
        self.block = _CastDropBlock()
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros_like(x)
        for _ in range(self.steps):
            h = self.block(h, x)
        return h


@pytest.mark.parametrize("energy", [1.0, 0.9])
def test_dropout_casts_and_matmul_weights_trace_without_a_graph_break(energy):
    x = _low_rank(4, 24, 16)
    torch.manual_seed(0)
    model = _Refiner()
    comp = laser_fx.compress(copy.deepcopy(model), sites=["block"],
                             config=LaserConfig(mode="linear", energy=energy, min_numel=0),
                             example_inputs=(x,))
    explained = torch._dynamo.explain(comp)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(comp, backend=BACKEND, fullgraph=True)
    reference = torch.compile(model, backend=BACKEND, fullgraph=True)
    first = next(_compiled.TOKENS)
    g_c = _grads(comp, compiled, (x,), seed=1)
    g_ref = _grads(model, reference, (x,), seed=1)  # the same masks: the graph's own stream
    assert next(_compiled.TOKENS) - first - 1 == 2 * model.steps  # both linear ops, each call
    if energy == 1.0:
        torch.testing.assert_close(g_c, g_ref, rtol=1e-5, atol=1e-6)
    else:
        stats = _wrappers(comp)[0].stats
        assert stats.stored_bytes < stats.dense_bytes
        assert float(F.cosine_similarity(g_c, g_ref, dim=0)) > 0.9
    # the masks differ with the seed: dropout really runs in the compiled graph
    assert not torch.equal(_grads(comp, compiled, (x,), seed=2), g_c)


def test_records_live_as_long_as_their_graph():
    x = torch.randn(4, 24, 16)
    model = laser_fx.compress(_Refiner(), sites=["block"],
                              config=LaserConfig(mode="linear", min_numel=0),
                              example_inputs=(x,))
    model.eval()  # no dropout: two backwards of one graph give the same gradients
    compiled = torch.compile(model, backend=BACKEND)
    check_records_follow_their_graph(model, compiled, (x,), 2 * model.steps)


@pytest.mark.parametrize("energy", [1.0, 0.95])
def test_autocast_traced_linear_gives_the_eager_gradients(energy):
    x = _low_rank(4, 24, 16)
    torch.manual_seed(0)
    model = _Refiner().eval()
    config = LaserConfig(mode="linear", energy=energy, min_numel=0)
    eager = laser_fx.compress(copy.deepcopy(model), sites=["block"], config=config,
                              example_inputs=(x,))
    comp = laser_fx.compress(copy.deepcopy(model), sites=["block"], config=config,
                             example_inputs=(x,))
    compiled = torch.compile(comp, backend=BACKEND, fullgraph=True)
    fp32 = _grads(model, model, (x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = _grads(model, model, (x,))
        for _ in range(2):
            g_c, g_e = _grads(comp, compiled, (x,)), _grads(eager, eager, (x,))
    # bf16 rounds differently in the compiled graph, so ranks may differ by one: compare
    # directions (a wrong weight gradient is far off)
    cos = [float(F.cosine_similarity(a, b, dim=0)) for a, b in ((g_c, g_e), (g_c, exact))]
    assert min(cos) > (0.9999 if energy == 1.0 else 0.999), cos
    if energy == 1.0:  # autocast ran: compiled is nearer eager bf16 than bf16 is to fp32
        rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
        assert rel(g_c, g_e) < rel(g_e, fp32) / 2, (rel(g_c, g_e), rel(g_e, fp32))
    stats = _wrappers(comp)[0].stats
    assert (stats.stored_bytes < stats.dense_bytes) == (energy < 1.0)


@settings(deadline=None, max_examples=8)
@given(st.integers(0, 2**31 - 1), st.integers(2, 40), st.sampled_from([0.5, 0.9, 0.999]),
       st.integers(2, 4))
def test_compiled_linear_mode_equals_eager_linear_mode(seed, rows, energy, steps):
    # any number of rows (dense records below min_numel, ranks up to the width), energies and
    # recursion depths: the traced ops take the eager trackers' decisions
    torch.manual_seed(seed)
    x = torch.randn(2, rows, 16)
    model = _Refiner(steps).eval()
    config = LaserConfig(mode="linear", energy=energy, min_numel=64)
    eager = laser_fx.compress(copy.deepcopy(model), sites=["block"], config=config,
                              example_inputs=(x,))
    comp = laser_fx.compress(copy.deepcopy(model), sites=["block"], config=config,
                             example_inputs=(x,))
    compiled = torch.compile(comp, backend=BACKEND)
    for _ in range(2):
        torch.testing.assert_close(_grads(comp, compiled, (x,)), _grads(eager, eager, (x,)),
                                   rtol=1e-4, atol=1e-6)


class _RawRecurrence(nn.Module):
    """An RNN cell written out: one parameter applied in a loop of the model's own forward
    (a parameter site: hooks on the model, no module to swap)."""

    def __init__(self, d: int = 16, steps: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.W = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.inp(x)
        h = torch.zeros_like(u)
        for _ in range(self.steps):
            h = torch.tanh(h @ self.W.to(h.dtype) + u)
        return h


def test_a_parameter_site_traces_each_application_and_matches_eager():
    x = _low_rank(4, 24, 16)
    torch.manual_seed(0)
    model = _RawRecurrence()
    config = LaserConfig(energy=0.9, min_numel=0)
    eager = laser_fx.compress(copy.deepcopy(model), config=config, example_inputs=(x,))
    comp = laser_fx.compress(copy.deepcopy(model), config=config, example_inputs=(x,))
    explained = torch._dynamo.explain(copy.deepcopy(comp))(x)  # a run: on a copy
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(comp, backend=BACKEND, fullgraph=True)
    first = next(_compiled.TOKENS)
    for _ in range(3):
        torch.testing.assert_close(_grads(comp, compiled, (x,)), _grads(eager, eager, (x,)),
                                   rtol=1e-5, atol=1e-6)
    assert next(_compiled.TOKENS) - first - 1 == 3 * model.steps  # every application
    (_, site_c), = laser_fx.param_site.param_sites_of(comp)
    (_, site_e), = laser_fx.param_site.param_sites_of(eager)
    # per step (the eager count was 0 from the second step: the step hook ran after ours)
    assert site_c.stats.calls == site_e.stats.calls == model.steps
    assert site_c.stats.stored_bytes == site_e.stats.stored_bytes < site_c.stats.dense_bytes
    assert site_c.trackers.keys() == site_e.trackers.keys()
