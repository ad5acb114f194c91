"""The rewrite passes (outline, plan, insert_compression, verify) and the pass runner.

Every rewrite pass gets STYLE's three checks: the structure changed as expected, a second run
reports ``modified=False``, and outputs are equal.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx import GraphModule

import laser_fx
from laser_fx import ConfigError, LaserConfig, NoSitesError
from laser_fx.errors import LaserFxError
from laser_fx.passes import META_KEY, PassError, PassResult, run_passes
from laser_fx.passes.find_sites import find_sites_pass
from laser_fx.passes.insert_compression import insert_compression
from laser_fx.passes.outline import OutlineError, graph_nodes_of_call, outline_call
from laser_fx.passes.plan import AUTO_BLOCK_MODE, plan_sites
from laser_fx.passes.verify import VerifyError, verify
from laser_fx.testing.zoo import ZOO


def _traced(name="trm_attn"):
    model, inputs = ZOO[name]()
    return model, inputs, laser_fx.trace(model, inputs)


def test_outline_call_is_a_pure_function_of_its_inputs():
    model, inputs, gm = _traced()
    group = graph_nodes_of_call(gm, "net", 7, META_KEY)  # the y-update of the grad cycle
    assert group and all(n.op != "get_attr" for n in group)
    out = outline_call(gm, group, "net_call7")
    # no tensor of its own: parameters arrive as inputs, so state_dict has no second owner
    assert dict(out.module.named_parameters()) == {} and dict(out.module.named_buffers()) == {}
    assert any(out.is_param) and not all(out.is_param)
    # run the original graph, capture the call's inputs/outputs, replay through the outline
    env = {}
    interp = torch.fx.Interpreter(gm)
    orig_run = interp.run_node

    def record(n):
        env[n] = orig_run(n)
        return env[n]

    interp.run_node = record
    interp.run(*inputs)
    got = out.module(*[env[i] for i in out.inputs])
    want = env[out.outputs[0]] if len(out.outputs) == 1 else tuple(env[o] for o in out.outputs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_outline_rejects_a_non_convex_group():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.relu, (x,))
    b = g.call_function(torch.neg, (a,))  # outside the group, depends on a, feeds c
    c = g.call_function(torch.add, (a, b))
    g.output(c)
    gm = GraphModule(torch.nn.Module(), g)
    with pytest.raises(OutlineError, match="both depends on and feeds"):
        outline_call(gm, [a, c], "bad")


def test_plan_is_analysis_only_and_prefers_blocks():
    _, _, gm = _traced()
    sites = find_sites_pass(gm).record
    before = gm.code
    res = plan_sites(gm, sites)
    assert res.modified is False and gm.code == before
    plan = res.record
    assert list(plan.chosen) == ["net"] and plan.chosen["net"][1] == AUTO_BLOCK_MODE
    assert all(why.startswith("covered by block net") for why in plan.skipped.values())
    lin = plan_sites(gm, sites, config=LaserConfig(mode="linear")).record
    assert "net" not in lin.chosen and all(m == "linear" for _, m, _ in lin.chosen.values())


def test_plan_without_grad_uses_is_no_sites():
    _, _, gm = _traced()
    sites = [s for s in find_sites_pass(gm).record if s.kind != "module"]
    nograd = [type(s)(s.name, s.kind, s.width, tuple(u for u in s.uses if not u.grad_enabled),
                      s.param) for s in sites]
    with pytest.raises(NoSitesError, match="Nothing to compress"):
        plan_sites(gm, nograd)


@pytest.mark.parametrize("mode", ["linear", "region", "checkpoint"])
def test_insert_compression_three_checks(mode):
    model, inputs, gm = _traced()
    sites = find_sites_pass(gm).record
    plan = plan_sites(gm, sites, config=LaserConfig(mode=mode)).record
    res = insert_compression(gm, plan)
    assert res.modified
    gm.graph.lint()
    gm.recompile()
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("laser_fx.sites.")]
    grad_uses = sum(s.grad_uses for s, _, _ in plan.chosen.values())
    assert len(calls) == grad_uses  # one site call per grad-enabled use
    assert all(n.meta[META_KEY]["compressed"] == mode for n in calls)
    if mode != "linear":  # the block's grad-enabled calls are gone from the flat graph
        assert not graph_nodes_of_call(gm, "net", 7, META_KEY)
    again = insert_compression(gm, plan)
    assert again.modified is False
    torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=0, atol=0)


def test_verify_catches_a_wrong_forward():
    model, inputs, gm = _traced("looped_transformer")
    assert verify(gm, model, inputs).record == {"compared": True}
    for n in gm.graph.nodes:
        if n.op == "output":
            with gm.graph.inserting_before(n):
                bad = gm.graph.call_function(torch.mul, (n.args[0], 1.5))
            n.args = (bad,)
    gm.recompile()
    with pytest.raises(VerifyError, match="differs from the original"):
        verify(gm, model, inputs)


def test_run_passes_names_the_failing_pass():
    _, _, gm = _traced("unrolled_rnn")

    def first(g):
        return PassResult(g, False)

    def broken(g):
        raise RuntimeError("boom")

    with pytest.raises(PassError, match=r"pass `broken` failed \(passes before it: \['first'\]\).*boom"):
        run_passes(gm, [first, broken])

    def library_error(g):
        raise ConfigError("bad value")

    with pytest.raises(ConfigError) as info:  # library errors keep their type, gain a note
        run_passes(gm, [first, library_error])
    assert "laser_fx pass `library_error`" in "".join(getattr(info.value, "__notes__", []))
    assert issubclass(PassError, LaserFxError)
