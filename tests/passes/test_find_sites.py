"""Tests of the site analysis (`laser_fx.passes.find_sites`, `laser_fx.find_sites`).

fx graphs come from ``laser_fx.trace(model)`` without inputs (no verification run, so the
tests stay fast); exported graphs from ``laser_fx.trace(model, inputs, method="export")``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import laser_fx
from laser_fx.passes import META_KEY
from laser_fx.passes.find_sites import find_sites_pass
from laser_fx.testing.zoo import NEGATIVE, ZOO, swiglu_hidden

_TRM = {"d": 16, "seq": 4, "heads": 2, "expansion": 2}


def _trm(mixer: str, n: int, T: int, seq: int = 4):
    return ZOO[f"trm_{mixer}"](**{**_TRM, "seq": seq}, n=n, T=T)


def _signature(sites):
    """What must agree between fx and export: names, kinds, widths, use counts, grad split."""
    return [
        (s.name, s.kind, s.width, s.num_uses, s.grad_uses, s.block, s.widths,
         tuple(u.grad_enabled for u in s.uses), tuple(u.call_index for u in s.uses),
         tuple(u.shape for u in s.uses))
        for s in sites
    ]


def _expected_trm_linears(mixer: str, d: int, seq: int, expansion: float) -> dict[str, int]:
    hidden_d, hidden_seq = swiglu_hidden(d, expansion), swiglu_hidden(seq, expansion)
    want: dict[str, int] = {}
    for b in range(2):
        p = f"net.blocks.{b}"
        if mixer == "attn":
            want.update({f"{p}.mix.{x}": d for x in "qkvo"})
        else:  # token mixing: the linears run over the sequence axis
            want.update({f"{p}.mix.mlp.gate": seq, f"{p}.mix.mlp.up": seq,
                         f"{p}.mix.mlp.down": hidden_seq})
        want.update({f"{p}.mlp.gate": d, f"{p}.mlp.up": d, f"{p}.mlp.down": hidden_d})
    return want


@pytest.mark.parametrize("mixer", ["attn", "mlp_t"])
@settings(max_examples=8)
@given(n=st.integers(1, 3), T=st.integers(1, 3))
def test_trm_sites_counts_widths_and_order(mixer, n, T):
    model, x = _trm(mixer, n, T)
    sites = laser_fx.find_sites(laser_fx.trace(model), x)
    by_name = {s.name: s for s in sites}
    want = _expected_trm_linears(mixer, 16, 4, 2)
    op_sites = {s.name: s.width for s in sites if s.kind != "module"}
    assert op_sites == want  # lm_head and embed (applied once) are not sites
    for name in want:
        s = by_name[name]
        assert (s.kind, s.param, s.block) == ("linear", f"{name}.weight", "net")
        assert s.grad_uses == n + 1, name
        assert s.nograd_uses == (T - 1) * (n + 1), name
        # execution order: the no-grad cycles come first, then the last cycle
        assert [u.step for u in s.uses] == list(range((n + 1) * T))
        assert [u.call_index for u in s.uses] == list(range((n + 1) * T))
        assert [u.grad_enabled for u in s.uses] == [False] * ((T - 1) * (n + 1)) + [True] * (n + 1)
        assert all(u.shape is not None and u.shape[-1] == s.width for u in s.uses)
    net = by_name["net"]
    assert net.kind == "module" and net.param is None
    assert net.num_uses == (n + 1) * T and net.grad_uses == n + 1
    assert net.widths == tuple(sorted(set(want.values())))
    assert net.width == max(want.values())


@pytest.mark.parametrize("mixer", ["attn", "mlp_t"])
def test_fx_and_export_find_the_same_sites(mixer):
    model, x = _trm(mixer, n=1, T=2)
    fx_sites = laser_fx.find_sites(laser_fx.trace(model), x)
    ep = laser_fx.trace(model, x, method="export")
    assert ep._laser_fx_trace["method"] == "export"
    ep_sites = laser_fx.find_sites(ep, x)
    assert _signature(ep_sites) == _signature(fx_sites)
    # the no-grad uses sit inside wrap_with_set_grad_enabled submodules of the exported graph
    q = next(s for s in ep_sites if s.name == "net.blocks.0.mlp.gate")
    assert all("/" in u.node for u in q.uses if not u.grad_enabled)
    assert all("/" not in u.node for u in q.uses if u.grad_enabled)


@pytest.mark.parametrize("name", ["unrolled_rnn", "grad_modes"])
def test_fx_and_export_agree_on_small_zoo_models(name):
    model, x = ZOO[name]()
    fx_sites = laser_fx.find_sites(laser_fx.trace(model), x)
    ep_sites = laser_fx.find_sites(laser_fx.trace(model, x, method="export"), x)
    assert _signature(ep_sites) == _signature(fx_sites)


# name -> expected {site: (kind, width, uses, grad uses)}
_ZOO_CASES = {
    "unrolled_rnn": {"cell.inp": ("linear", 8, 6, 6), "cell.hid": ("linear", 32, 6, 6),
                     "cell": ("module", 32, 6, 6)},
    "recursive_conv": {"block.conv1": ("conv", 8, 3, 3), "block.conv2": ("conv", 8, 3, 3),
                       "block": ("module", 8, 3, 3)},
    "looped_transformer": {
        **{f"layers.0.attn.{x}": ("linear", 64, 4, 4) for x in "qkvo"},
        "layers.0.fc1": ("linear", 64, 4, 4), "layers.0.fc2": ("linear", 256, 4, 4),
        "layers.0": ("module", 256, 4, 4),
    },
    # lin: h, three decorated no-grad helpers, u, v (enable_grad), u2, s, the last call
    "grad_modes": {"lin": ("linear", 16, 9, 3)},
}


@pytest.mark.parametrize("name", sorted(_ZOO_CASES))
def test_zoo_sites(name):
    model, x = ZOO[name]()
    sites = laser_fx.find_sites(model)
    got = {s.name: (s.kind, s.width, s.num_uses, s.grad_uses) for s in sites}
    assert got == _ZOO_CASES[name]
    # op sites first (in order of first use), module sites last
    kinds = [s.kind == "module" for s in sites]
    assert kinds == sorted(kinds)


def test_grad_modes_use_order():
    model, _ = ZOO["grad_modes"]()
    (lin,) = laser_fx.find_sites(model)
    assert [u.grad_enabled for u in lin.uses] == [
        True, False, False, False, False, True, False, False, True
    ]


@pytest.mark.parametrize("name", sorted(set(NEGATIVE) - {"data_dependent_loop"}))
def test_negative_zoo_models_have_no_sites(name):
    model, x = ZOO[name]()
    assert laser_fx.find_sites(model, x) == []


class _TiedLM(nn.Module):
    """Embedding and lm_head share one matrix (applied once each); a linear runs in a loop."""

    def __init__(self, vocab: int = 10, d: int = 8, loops: int = 3) -> None:
        super().__init__()
        self.loops = loops
        self.embed = nn.Embedding(vocab, d)
        self.loop = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        for _ in range(self.loops):
            h = torch.tanh(self.loop(h))
        return self.lm_head(h)


class _TwoModulesOneMatrix(nn.Module):
    """Two different linears share a weight; each is applied once: not a recursion."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class _MatmulSides(nn.Module):
    """``h @ W`` in a loop (a site), ``V @ y`` in a loop (parameter on the left: not a site)."""

    def __init__(self, d: int = 8, k: int = 6) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.V = nn.Parameter(torch.randn(k, k) / k**0.5)

    def forward(self, x, y):
        for _ in range(3):
            x = torch.tanh(x @ self.W)
        for _ in range(2):
            y = torch.tanh(self.V @ y)
        return x.sum() + y.sum()


class _DepthwiseLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(6, 6, 3, padding=1, groups=3)

    def forward(self, x):
        for _ in range(2):
            x = F.gelu(self.conv(x))
        return x


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    if isinstance(model, _TiedLM):
        return (torch.randint(0, 10, (2, 5), generator=g),)
    if isinstance(model, _MatmulSides):
        return (torch.randn(4, 8, generator=g), torch.randn(6, 3, generator=g))
    if isinstance(model, _DepthwiseLoop):
        return (torch.randn(2, 6, 7, generator=g),)
    return (torch.randn(2, 8, generator=g),)


# model -> {site: (kind, width, uses)}
_CUSTOM = [
    pytest.param(_TiedLM, {"loop": ("linear", 8, 3)}, id="tied-embedding-is-not-a-site"),
    pytest.param(_TwoModulesOneMatrix, {}, id="one-matrix-two-modules-once-each"),
    # X @ W: width W.shape[0]; W @ X keeps the activation on the other side (documented)
    pytest.param(_MatmulSides, {"W": ("matmul", 8, 3)}, id="x-at-w-only"),
    # width = in_channels = weight.shape[1] * groups
    pytest.param(_DepthwiseLoop, {"conv": ("conv", 6, 2)}, id="grouped-conv-width"),
]


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("cls, want", _CUSTOM)
def test_weight_sharing_rules(cls, want, method):
    torch.manual_seed(0)
    model = cls()
    x = _inputs(model)
    gm = laser_fx.trace(model, x, method=method)
    sites = laser_fx.find_sites(gm, x)
    assert {s.name: (s.kind, s.width, s.num_uses) for s in sites} == want


@pytest.mark.parametrize("method", ["fx", "export"])
def test_activation_shapes_and_bytes(method):
    torch.manual_seed(0)
    model = _MatmulSides()
    x = _inputs(model)
    gm = laser_fx.trace(model, x, method=method)
    (site,) = laser_fx.find_sites(gm, x)
    assert [u.shape for u in site.uses] == [(4, 8)] * 3
    assert [u.nbytes for u in site.uses] == [4 * 8 * 4] * 3
    assert site.activation_bytes == 3 * 4 * 8 * 4


def test_shapes_follow_the_example_inputs_given():
    model, _ = _trm("attn", n=1, T=1)
    gm = laser_fx.trace(model)
    for batch in (2, 3):
        x = torch.randint(0, 12, (batch, 4))
        site = next(s for s in laser_fx.find_sites(gm, (x,)) if s.name == "net.blocks.0.mix.q")
        assert {u.shape for u in site.uses} == {(batch, 4, 16)}
        assert site.activation_bytes == 2 * batch * 4 * 16 * 4


def test_no_shapes_without_example_inputs():
    model, _ = _trm("mlp_t", n=1, T=2)
    sites = laser_fx.find_sites(model)
    assert sites
    assert all(u.shape is None and u.nbytes is None for s in sites for u in s.uses)
    assert all(s.activation_bytes is None for s in sites)


def test_shape_recording_has_no_side_effects():
    class Stateful(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            for _ in range(2):
                x = F.dropout(self.bn(self.lin(x)), 0.5)
            return x

    model = Stateful()
    # BatchNorm as a leaf: its size check cannot be traced through
    gm = laser_fx.trace(model, leaf_modules=[nn.BatchNorm1d])
    stats = model.bn.running_mean.clone()
    torch.manual_seed(1)
    laser_fx.find_sites(gm, (torch.randn(8, 4),))
    after = torch.rand(3)
    torch.manual_seed(1)
    torch.randn(8, 4)
    assert torch.equal(after, torch.rand(3)), "the caller's RNG stream moved"
    assert torch.equal(model.bn.running_mean, stats), "BatchNorm statistics changed"
    assert torch.is_grad_enabled()


def test_wrong_example_inputs_are_config_errors():
    model, x = _trm("attn", n=1, T=1)
    with pytest.raises(laser_fx.ConfigError, match="do not match the traced forward"):
        laser_fx.find_sites(laser_fx.trace(model), (x[0], x[0]))


def test_find_sites_rejects_non_modules():
    with pytest.raises(laser_fx.TraceError, match="expects an nn.Module or a GraphModule"):
        laser_fx.find_sites(lambda x: x)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_pass_is_analysis_only_and_idempotent(method):
    model, x = ZOO["unrolled_rnn"]()
    gm = laser_fx.trace(model, x, method=method)
    laser_fx.find_sites(gm, x)  # records shapes
    code = gm.code
    first = find_sites_pass(gm)
    second = find_sites_pass(gm)
    assert first.modified is False and second.modified is False
    assert first.graph_module is gm
    assert first.record == second.record
    assert gm.code == code
    # each use is tagged in node.meta for the rewrite passes
    tagged = [n.meta[META_KEY]["use_index"] for n in gm.graph.nodes
              if n.meta.get(META_KEY, {}).get("site") == "cell.hid"]
    assert tagged == list(range(6))


def test_site_str_and_counts():
    model, x = ZOO["unrolled_rnn"]()
    site = next(s for s in laser_fx.find_sites(model, x) if s.name == "cell.hid")
    assert str(site) == "cell.hid (linear, width 32): 6 uses, 6 with grad"
    assert (site.num_uses, site.grad_uses, site.nograd_uses) == (6, 6, 0)
