"""Tests of `laser_fx.tracing`: grad-mode-faithful capture, fallback, verification, annotate."""

from __future__ import annotations

import weakref
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from laser_fx.errors import ConfigError, TraceError
from laser_fx.testing.zoo import TRACEABLE, ZOO, make_inputs
from laser_fx.tracing import annotate, trace

SET_GRAD = torch._C._set_grad_enabled
WRAP = torch.ops.higher_order.wrap_with_set_grad_enabled


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: with 2 intra-op threads on a shared, loaded 2-core machine,
    # OpenMP spin-waiting made each op ~50x slower (measured); one thread avoids that.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _AliveStorages(TorchDispatchMode):
    """Bytes of the storages created under the mode that are still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s.nbytes() and s.data_ptr() not in self.alive:
                    self.alive[s.data_ptr()] = s.nbytes()
                    weakref.finalize(s, self.alive.pop, s.data_ptr(), None)
        return out


def _kept_bytes(fn: nn.Module, inputs: tuple) -> int:
    """Bytes created by the forward that are alive after it (saved for backward + output)."""
    mode = _AliveStorages()
    with mode:
        out = fn(*inputs)
    kept = sum(mode.alive.values())
    del out
    return kept


def _grads(fn: nn.Module, params: list[nn.Parameter], inputs: tuple) -> list[torch.Tensor]:
    out = fn(*inputs)
    got = torch.autograd.grad(out.sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got, strict=True)]


def _all_nodes(gm: nn.Module):
    """Nodes of gm and of its exported grad-mode submodules, in execution order."""
    for node in gm.graph.nodes:
        yield node
        if node.target is WRAP:
            yield from _all_nodes(getattr(gm, node.args[1].target))


@pytest.fixture(scope="module")
def trm_export():
    model, inputs = ZOO["trm_attn"](d=32, n=1, T=2, seq=8)
    return model, inputs, trace(model, inputs, method="export")


# ------------------------------------------------------------------ capture equals eager


SMALL = {"trm_attn": {"d": 32, "seq": 8}, "trm_mlp_t": {"d": 32, "seq": 8}}


@pytest.mark.parametrize("name", TRACEABLE)
def test_capture_matches_eager_forward_and_grads(name):
    model, inputs = ZOO[name](**SMALL.get(name, {}))
    gm = trace(model, inputs)
    assert gm._laser_fx_trace == {"method": "fx", "leaf_modules": []}
    torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    for a, b in zip(_grads(gm, params, inputs), _grads(model, params, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # shared, not copied: an optimizer on the model trains the capture
    own = dict(model.named_parameters())
    assert own and all(t is own[k] for k, t in gm.named_parameters())
    # the capture is not specialized to the example batch size
    other = make_inputs(model, batch=3, seed=1)
    torch.testing.assert_close(gm(*other), model(*other), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixer", ["attn", "mlp_t"])
def test_trm_capture_keeps_eager_bytes_and_plain_fx_keeps_T_times_more(mixer):
    model, inputs = ZOO[f"trm_{mixer}"](d=32, seq=8, T=2)
    gm = trace(model, inputs)
    eager, ours = _kept_bytes(model, inputs), _kept_bytes(gm, inputs)
    assert abs(ours - eager) <= 0.05 * eager, f"captured keeps {ours} B, eager {eager} B"
    # pytorch#62043: plain fx drops no_grad, so the no-grad cycle is kept for backward too
    naive = torch.fx.symbolic_trace(model)
    plain = _kept_bytes(naive, inputs)
    assert plain >= 1.6 * eager, f"plain fx keeps {plain} B, eager {eager} B"
    # ... and its gradients are wrong, since they flow through the no-grad cycle
    params = list(model.net.parameters())
    diff = max((a - b).abs().max().item() for a, b in zip(
        _grads(naive, params, inputs), _grads(model, params, inputs), strict=True))
    assert diff > 1e-4


def test_example_kwargs_are_verified_and_callable_by_name():
    model, (x,) = ZOO["looped_transformer"](d=16, loops=2)
    gm = trace(model, (), {"h": x})
    torch.testing.assert_close(gm(h=x), model(x))


def test_trm_grad_mode_nodes_mark_the_no_grad_cycle():
    model, inputs = ZOO["trm_attn"](d=32, seq=8, n=2, T=3)
    gm = trace(model, inputs)
    switches = [n for n in gm.graph.nodes if n.target is SET_GRAD]
    # T-1 no_grad regions: an enter (False) and a restore each
    assert [n.args[0] for n in switches[::2]] == [False, False]
    restores = [n.args[0] for n in switches[1::2]]
    assert all(a.target is torch.is_grad_enabled for a in restores)
    gm.graph.eliminate_dead_code()  # the switches are side-effectful: DCE keeps them
    assert sum(n.target is SET_GRAD for n in gm.graph.nodes) == 4


def test_grad_modes_model_all_constructs():
    model, inputs = ZOO["grad_modes"]()
    gm = trace(model, inputs, method="fx")
    modes = [n.args[0] for n in gm.graph.nodes if n.target is SET_GRAD]
    # 3 decorators + set_grad_enabled ctx + nested enable_grad: enter False/True and a
    # run-time restore each; the plain function calls: static False, then True
    assert sum(m is False for m in modes) == 5 and sum(m is True for m in modes) == 2
    assert sum(isinstance(m, torch.fx.Node) for m in modes) == 5
    params = list(model.parameters())
    naive = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(_grads(gm, params, inputs), _grads(model, params, inputs))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(_grads(naive, params, inputs), _grads(model, params, inputs))


def test_capture_called_under_outer_no_grad_behaves_like_eager():
    # regression: the exit of a no_grad region restores the caller's mode (read at run
    # time), not a trace-time True, so evaluation under no_grad builds no autograd graph
    model, inputs = ZOO["trm_mlp_t"](d=32, seq=8, T=2)
    gm = trace(model, inputs)
    with torch.no_grad():
        out = gm(*inputs)
        assert not torch.is_grad_enabled()
    assert not out.requires_grad
    assert torch.is_grad_enabled()


# ------------------------------------------------------------------------------ export


def test_export_path_matches_and_shares_parameters(trm_export):
    model, inputs, gm = trm_export
    assert gm._laser_fx_trace["method"] == "export"
    assert any(n.target is WRAP and n.args[0] is False for n in gm.graph.nodes)
    own = dict(model.named_parameters())
    assert all(t is own[k] for k, t in gm.named_parameters())
    assert dict(gm.named_buffers())["y_init"] is model.y_init
    # export's input-shape guard is a call_module node; it belongs to no user module
    guards = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in guards] == ["_guards_fn"]
    assert guards[0].meta["laser_fx"]["module_stack"] == []
    torch.testing.assert_close(gm(*inputs), model(*inputs))
    params = list(model.parameters())
    torch.testing.assert_close(_grads(gm, params, inputs), _grads(model, params, inputs))
    eager, ours = _kept_bytes(model, inputs), _kept_bytes(gm, inputs)
    assert abs(ours - eager) <= 0.05 * eager
    other = make_inputs(model, batch=3, seed=2)  # Dim.AUTO: not pinned to batch 2
    torch.testing.assert_close(gm(*other), model(*other))


def test_export_annotate_marks_wrapped_region(trm_export):
    _, _, gm = trm_export
    calls = Counter()
    for node in _all_nodes(gm):
        info = node.meta["laser_fx"]
        if node.op == "call_function" and "linear" in str(node.target):
            for path, i in info["module_stack"]:
                if path == "net.blocks.0.mlp.gate":
                    calls[(i, info["grad_enabled"])] += 1
    # n=1, T=2: gate used 4 times, the first cycle's 2 calls without grad
    assert calls == {(0, False): 1, (1, False): 1, (2, True): 1, (3, True): 1}


def test_auto_falls_back_to_export_when_fx_fails():
    class RowLoop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.stack([self.lin(self.lin(row)) for row in x])  # iterates a Proxy

    torch.manual_seed(0)
    model, x = RowLoop(), torch.randn(3, 4)
    with pytest.raises(TraceError, match=r"could not trace RowLoop.*Pass example_inputs"):
        trace(model)
    gm = trace(model, (x,))
    assert gm._laser_fx_trace["method"] == "export"
    torch.testing.assert_close(gm(x), model(x))


# ------------------------------------------------------------------------ negative cases


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"method": "fx"}, id="fx"),
        pytest.param({}, id="auto-no-inputs"),
        pytest.param({"with_inputs": True}, id="auto-export-fallback"),
    ],
)
def test_data_dependent_loop_raises_trace_error(kwargs):
    model, inputs = ZOO["data_dependent_loop"]()
    args = inputs if kwargs.pop("with_inputs", False) else ()
    with pytest.raises(
        TraceError,
        match=r"data-dependent control flow at .*zoo\.py:\d+ \(`if h\.mean\(\) > 0.*"
        r"laser_fx\.compress\(model\.body",
    ):
        trace(model, args, **kwargs)


@pytest.mark.parametrize(
    ("model", "kwargs", "error", "match"),
    [
        pytest.param(lambda x: x, {}, TraceError, r"needs an nn\.Module, got function", id="function"),
        pytest.param(nn.Linear(2, 2), {"method": "jit"}, ConfigError, r"`method` must be one of", id="method"),
        pytest.param(nn.Linear(2, 2), {"method": "export"}, ConfigError, r"needs example_inputs", id="export-no-inputs"),
        pytest.param(
            nn.Linear(2, 2),
            {"method": "export", "example_inputs": (torch.ones(1, 2),), "leaf_modules": [nn.Linear]},
            ConfigError, r"`leaf_modules` is an fx option", id="export-leaves",
        ),
    ],
)
def test_bad_arguments(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        trace(model, **kwargs)


def test_capture_that_computes_something_else_is_refused():
    class RawSwitch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            torch._C._set_grad_enabled(False)  # a raw switch: runs at trace time, unrecorded
            h = self.a(x)
            torch._C._set_grad_enabled(True)
            return self.b(h) + self.a(x)

    torch.manual_seed(0)
    with pytest.raises(TraceError, match=r"fx capture of RawSwitch does not match.*gradient of `a\.weight`"):
        trace(RawSwitch(), (torch.randn(2, 4),), method="fx")


# ---------------------------------------------------------------------- leaves, annotate


@pytest.mark.parametrize(
    "leaf",
    [pytest.param("net", id="name"), pytest.param("instance", id="instance"),
     pytest.param("type", id="type")],
)
def test_leaf_modules_stay_call_module(leaf):
    model, inputs = ZOO["trm_attn"](d=32, seq=8, n=2, T=2)
    spec = {"net": "net", "instance": model.net, "type": type(model.net)}[leaf]
    gm = trace(model, inputs, leaf_modules=[spec])
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["net"] * 6
    stacks = [n.meta["laser_fx"]["module_stack"] for n in calls]
    assert stacks == [[("net", i)] for i in range(6)]
    assert [n.meta["laser_fx"]["grad_enabled"] for n in calls] == [False] * 3 + [True] * 3


def test_annotate_trm_call_indices_and_grad_flags():
    n, T = 3, 2
    model, inputs = ZOO["trm_attn"](d=32, seq=8, n=n, T=T)
    gm = trace(model, inputs)
    net_calls: dict[int, set[bool]] = {}
    for node in gm.graph.nodes:
        info = node.meta["laser_fx"]
        for path, i in info["module_stack"]:
            if path == "net":
                net_calls.setdefault(i, set()).add(info["grad_enabled"])
    assert sorted(net_calls) == list(range((n + 1) * T))
    assert all(len(v) == 1 for v in net_calls.values())
    no_grad = [i for i, v in net_calls.items() if v == {False}]
    assert no_grad == list(range((T - 1) * (n + 1)))
    # idempotent, and other laser_fx keys survive
    node = next(iter(gm.graph.nodes))
    node.meta["laser_fx"]["site"] = "kept"
    before = {nd.name: dict(nd.meta["laser_fx"]) for nd in gm.graph.nodes}
    annotate(gm)
    assert {nd.name: nd.meta["laser_fx"] for nd in gm.graph.nodes} == before


@given(n=st.integers(1, 3), T=st.integers(1, 3), mixer=st.sampled_from(["attn", "mlp_t"]))
def test_property_trm_annotations_count_recursion(n, T, mixer):
    model, inputs = ZOO[f"trm_{mixer}"](d=16, seq=4, heads=2, n=n, T=T, expansion=2)
    gm = trace(model, inputs)
    linears = [nd for nd in gm.graph.nodes if nd.target is torch._C._nn.linear]
    uses = Counter(
        (nd.meta["laser_fx"]["module_stack"][-1][0], nd.meta["laser_fx"]["grad_enabled"])
        for nd in linears
    )
    assert uses[("net.blocks.1.mlp.down", True)] == n + 1
    assert uses[("net.blocks.1.mlp.down", False)] == (T - 1) * (n + 1)
    assert uses[("lm_head", True)] == 1
    torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)


@settings(deadline=None)
@given(st.integers(0, 2**16), st.floats(-9.0, -1.0).filter(lambda v: abs(v + 5) > 0.05))
def test_property_capture_comparison_norm_relative(seed, log_rel):
    """Ulp-level accumulation noise on a large-magnitude tensor with near-zero entries passes
    (as on a GPU); an error of 1e-3 of the norm never does, nor do inf/nan moved elsewhere."""
    from laser_fx.tracing import _mismatch

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(64, 32, generator=g, dtype=torch.float64) * 1e6
    a[0, :4] = 1e-3  # tiny entries: elementwise rtol alone fails on any noise there
    noise = torch.randn(a.shape, generator=g, dtype=torch.float64)
    rel = 10.0**log_rel
    b = a + noise * (rel * a.norm() / noise.norm())
    assert (_mismatch(a, b) is None) == (rel < 1e-5)  # (1e-5 itself is left out: rounding)
    assert _mismatch(a, a + noise * (1e-3 * a.norm() / noise.norm())) is not None
    c, d = a.clone(), a.clone()
    c[1, 1], d[2, 2] = float("inf"), float("inf")
    assert _mismatch(c, d) is not None
    assert _mismatch(c, c.clone()) is None
