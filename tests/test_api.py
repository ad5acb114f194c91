"""compress / report / strip / is_compressed: the one-call API over the zoo.

What compress must keep of the user's model (class, eval, state dict, copies, DDP, safety)
is pinned in test_surgery.py; site discovery in test_probe.py. Here: every mechanism is
lossless at ``energy=1.0`` on every zoo model, site selection (names, regex, callable,
``exclude``, ``per_site``), the errors for bad input, and the report's structure.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import laser_fx
from laser_fx import ConfigError, LaserConfig, NoSitesError
from laser_fx.testing.zoo import WEIGHT_SHARED, ZOO

MODES = ("auto", "linear", "region", "checkpoint")
CASES = [(name, mode) for name in WEIGHT_SHARED for mode in MODES]
# auto: a shared nn.Linear gets mode linear, every other module checkpoint
AUTO = {"trm_attn": ("net", "checkpoint"), "trm_mlp_t": ("net", "checkpoint"),
        "looped_transformer": ("layers.0", "checkpoint"), "unrolled_rnn": ("cell", "checkpoint"),
        "recursive_conv": ("block", "checkpoint"), "grad_modes": ("lin", "linear")}
# checkpoint at the default granularity "auto": the TRMs' `net` per layer (smaller estimated
# peak); the other blocks stay whole
SPLIT = {"trm_attn": ["net.blocks.0", "net.blocks.1"],
         "trm_mlp_t": ["net.blocks.0", "net.blocks.1"]}


def _loss(out):
    return out.float().pow(2).mean()


def _grads(model, inputs, params):
    return torch.autograd.grad(_loss(model(*inputs)), params)


def _sites(model):
    return laser_fx.report(model).to_dict()["sites"]


@pytest.mark.parametrize(("name", "mode"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_forward_equal_and_lossless_gradients(name, mode):
    model, inputs = ZOO[name]()
    ref = copy.deepcopy(model)
    out = laser_fx.compress(
        model, config=LaserConfig(energy=1.0, mode=mode, min_numel=0), example_inputs=inputs
    )
    assert out is model and laser_fx.is_compressed(model)
    site, auto = AUTO[name]
    mechanism = auto if mode == "auto" else mode
    units = SPLIT.get(name, [site]) if mechanism == "checkpoint" else [site]
    rows = _sites(model)
    assert [(r["name"], r["mechanism"]) for r in rows] == [(u, mechanism) for u in units]
    g = laser_fx.report(model).granularity
    if units != [site]:
        assert (g[site]["chosen"], g[site]["asked"], g[site]["units"]) == ("layer", "auto", units)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    for _ in range(2):  # the second step runs on warm trackers
        torch.testing.assert_close(model(*inputs), ref(*inputs), rtol=0, atol=0)
        for got, want in zip(_grads(model, inputs, params), _grads(ref, inputs, ref_params),
                             strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert [r["calls"] for r in _sites(model)] == [r["grad_uses"] for r in rows]


@pytest.mark.parametrize("name", WEIGHT_SHARED)
def test_strip_round_trip_equals_original(name):
    model, inputs = ZOO[name]()
    ref = copy.deepcopy(model)
    params = list(model.parameters())
    laser_fx.compress(model, example_inputs=inputs)
    assert laser_fx.strip(model) is model and not laser_fx.is_compressed(model)
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    torch.testing.assert_close(model(*inputs), ref(*inputs), rtol=0, atol=0)
    ref_params = list(ref.parameters())
    for got, want in zip(_grads(model, inputs, params), _grads(ref, inputs, ref_params),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_no_grad_calls_do_no_tracker_work():
    model, inputs = ZOO["trm_attn"]()
    laser_fx.compress(model, example_inputs=inputs)
    with torch.no_grad():
        model(*inputs)
    assert all(s["calls"] == 0 for s in _sites(model))
    assert all(not w.trackers for w in model.modules() if isinstance(w, laser_fx.SiteWrapper))
    _loss(model(*inputs)).backward()
    assert all(s["calls"] == s["grad_uses"] > 0 for s in _sites(model))
    # each grad-enabled forward starts a new step: counts do not pile up
    _loss(model(*inputs)).backward()
    assert all(s["calls"] == s["grad_uses"] for s in _sites(model))


# ------------------------------------------------------------------ selection
# The TRM-like zoo model: `net` is the shared block (called 8 times, 4 with grad); every
# module inside it is a nested site naming `net` as its block. "auto" selects `net`, which
# the default granularity "auto" checkpoints per layer.
SELECTORS = [
    ("auto", "auto", {"net.blocks.0", "net.blocks.1"}),
    ("names", ["net.blocks.0.mlp", "net.blocks.1.mix"], {"net.blocks.0.mlp", "net.blocks.1.mix"}),
    ("regex", r"net\.blocks\.\d\.mlp", {"net.blocks.0.mlp", "net.blocks.1.mlp"}),
    ("callable", lambda s: s.kind == "linear" and s.name.endswith(".o"),
     {"net.blocks.0.mix.o", "net.blocks.1.mix.o"}),
]


@pytest.mark.parametrize(("how", "spec", "want"), SELECTORS, ids=[c[0] for c in SELECTORS])
def test_site_selectors(how, spec, want):
    model, inputs = ZOO["trm_attn"]()
    laser_fx.compress(model, spec, example_inputs=inputs)
    rows = _sites(model)
    assert {s["name"] for s in rows} == want
    for s in rows:  # the selected module, and only it, is swapped
        assert isinstance(model.get_submodule(s["name"]), laser_fx.SiteWrapper)
        assert s["mechanism"] == ("linear" if s["module_type"] == "Linear" else "checkpoint")
    if how == "auto":  # the block `net` itself stays the user's module; the record says why
        assert not isinstance(model.net, laser_fx.SiteWrapper)
        assert laser_fx.report(model).granularity["net"]["units"] == sorted(want)


@pytest.mark.parametrize(("granularity", "units"), [
    ("block", ["net"]), ("auto", ["net.blocks.0", "net.blocks.1"])])
def test_a_block_covers_the_sites_inside_it(granularity, units):
    model, inputs = ZOO["trm_attn"]()
    laser_fx.compress(model, ["net", "net.blocks.0.mlp"],
                      config=LaserConfig(granularity=granularity), example_inputs=inputs)
    assert [s["name"] for s in _sites(model)] == units
    assert laser_fx.report(model).skipped == {"net.blocks.0.mlp": "covered by block net"}


def test_exclude_and_per_site_config():
    model, inputs = ZOO["trm_attn"]()
    cfg = LaserConfig(mode="linear",
                      per_site={r".*\.mlp": LaserConfig(rank=2, mode="region", min_numel=0)})
    laser_fx.compress(model, r"net\.blocks\.\d\.(mix|mlp)", config=cfg,
                      exclude=r"net\.blocks\.1\..*", example_inputs=inputs)
    _loss(model(*inputs)).backward()
    rep = laser_fx.report(model)
    rows = {s["name"]: s for s in rep.to_dict()["sites"]}
    assert set(rows) == {"net.blocks.0.mix", "net.blocks.0.mlp"}
    assert rows["net.blocks.0.mix"]["mechanism"] == "linear"
    assert rows["net.blocks.0.mlp"]["mechanism"] == "region"
    assert rows["net.blocks.0.mlp"]["rank"] == 2
    # every site the exclude regex matches is listed, nested ones too
    assert {"net.blocks.1.mix", "net.blocks.1.mlp", "net.blocks.1.mlp.down"} <= set(rep.skipped)
    assert all(k.startswith("net.blocks.1.") and why == "excluded"
               for k, why in rep.skipped.items())


BAD = [
    ("unknown-name", dict(sites=["net.nope"]), ConfigError,
     r"no site called \['net.nope'\].*Sites: \['net'"),
    ("regex-matches-nothing", dict(sites=r"foo.*"), ConfigError, "matches no site"),
    ("bad-regex", dict(sites="net(["), ConfigError, "regex .* is invalid"),
    ("bad-selector-type", dict(sites=3), ConfigError, "must be 'auto', a list"),
    ("bad-exclude-type", dict(exclude=3.5), ConfigError, "`exclude` must be 'auto', a list"),
    ("bad-config-type", dict(config={"energy": 0.9}), ConfigError, "must be a LaserConfig"),
    ("per-site-matches-nothing", dict(config=LaserConfig(per_site={"nope": LaserConfig()})),
     ConfigError, r"`per_site` pattern\(s\) \['nope'\] match no site"),
    ("everything-excluded", dict(sites=["net"], exclude=["net"]), NoSitesError,
     r"Nothing to compress in TRMLike.*'net': 'excluded'"),
    ("kwargs-as-inputs", dict(example_inputs={"tokens": 0}), ConfigError,
     "pass keyword inputs as `example_kwargs`"),
    ("inputs-do-not-bind", dict(example_kwargs={"nope": 1}), ConfigError,
     r"do not match TRMLike\.forward"),
]


@pytest.mark.parametrize(("case", "kwargs", "exc", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_errors(case, kwargs, exc, match):
    model, inputs = ZOO["trm_attn"]()
    before = list(model.named_modules())
    with pytest.raises(exc, match=match):
        laser_fx.compress(model, **{"example_inputs": inputs, **kwargs})
    assert list(model.named_modules()) == before and not laser_fx.is_compressed(model)


def test_no_sites_error_says_what_was_checked():
    model, inputs = ZOO["plain_mlp"]()
    with pytest.raises(NoSitesError, match=r"PlainMLP is applied more than once.*recursion"):
        laser_fx.compress(model, example_inputs=inputs)
    with pytest.raises(ConfigError, match="expects an nn.Module"):
        laser_fx.compress(lambda x: x)


@pytest.mark.parametrize("fn", [laser_fx.report, laser_fx.strip], ids=["report", "strip"])
def test_report_and_strip_reject_plain_modules(fn):
    model, _ = ZOO["trm_attn"]()
    with pytest.raises(ConfigError, match="TRMLike without compressed sites"):
        fn(model)


# ------------------------------------------------------------------ report
def test_report_table_and_dict():
    model, inputs = ZOO["trm_attn"]()
    laser_fx.compress(model, ["net.blocks.0", "net.blocks.1.mlp"], exclude=["net.blocks.1.mix"],
                      example_inputs=inputs)
    _loss(model(*inputs)).backward()
    rep = laser_fx.report(model)
    d = rep.to_dict()
    keys = {"name", "mechanism", "uses", "grad_uses", "width", "widths", "rank", "fidelity",
            "resets", "calls", "stored_bytes", "dense_bytes"}
    assert [s["name"] for s in d["sites"]] == ["net.blocks.0", "net.blocks.1.mlp"]
    for s in d["sites"]:
        assert keys <= s.keys()
        assert (s["uses"], s["grad_uses"], s["calls"]) == (8, 4, 4)
        assert 0 < s["stored_bytes"] < s["dense_bytes"], s
        assert 0 < s["rank"] <= s["width"] and 0 < s["fidelity"] <= 1.0 + 1e-6
    totals = d["totals"]
    assert totals["stored_bytes"] == sum(s["stored_bytes"] for s in d["sites"])
    assert totals["dense_bytes"] == sum(s["dense_bytes"] for s in d["sites"])
    assert totals["ratio"] == pytest.approx(totals["stored_bytes"] / totals["dense_bytes"])
    assert d["skipped"] == {"net.blocks.1.mix": "excluded"}
    text = str(rep)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["site", "mechanism", "calls"]
    assert lines[2].startswith("net.blocks.0 ") and lines[3].startswith("net.blocks.1.mlp ")
    assert lines[4].startswith("total") and f"{totals['ratio']:.3f}x" in lines[4]
    assert "left alone: net.blocks.1.mix: excluded" in text


def test_checkpoint_bytes_at_fixed_rank_match_the_formula():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            for _ in range(3):
                x = torch.tanh(self.lin(x))
            return x

    torch.manual_seed(0)
    model, x = Shared(), torch.randn(64, 16)
    laser_fx.compress(model, config=LaserConfig(rank=4, min_numel=0, mode="checkpoint"),
                      example_inputs=(x,))
    _loss(model(x)).backward()
    (s,) = _sites(model)
    # each call keeps its (64, 16) input as 64 x 4 coefficients and a row mean, all fp32;
    # the basis versions they refer to (16 x 4 each) are counted once
    per_call = (64 * 4 + 16) * 4
    bases, rest = divmod(s["stored_bytes"] - 3 * per_call, 16 * 4 * 4)
    assert rest == 0 and 1 <= bases <= 3, s["stored_bytes"]
    assert s["dense_bytes"] == 3 * 64 * 16 * 4  # what the linear would have kept per call


def test_training_smoke_default_laser_matches_loss():
    """25 AdamW steps on a learnable token task: LASER ends within 10% of uncompressed."""
    finals = {}
    for arm in ("base", "laser"):
        model, _ = ZOO["trm_attn"](seed=1)
        g = torch.Generator().manual_seed(0)
        x0 = torch.randint(0, model.vocab, (16, model.seq), generator=g)
        if arm == "laser":
            laser_fx.compress(model, example_inputs=(x0,))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(25):
            x = torch.randint(0, model.vocab, (16, model.seq), generator=g)
            target = (x + 1) % model.vocab  # learnable: next token id
            loss = F.cross_entropy(model(x).flatten(0, 1), target.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finals[arm] = loss.item()
    assert finals["base"] < 2.0, finals  # the task was learned at all
    assert abs(finals["laser"] - finals["base"]) <= 0.10 * finals["base"], finals


def test_report_bytes_are_the_activations_the_calls_save_not_the_weights():
    # the uncompressed bytes of a site are what its calls save of activations: Linear(16, w)
    # saves its (64, 16) input, Linear(w, 16) its (64, w) input; the weights (or the w.t()
    # views a linear may save) are not activations and do not count
    class Loop(nn.Module):
        def __init__(self, out: int) -> None:
            super().__init__()
            self.lin = nn.Sequential(nn.Linear(16, out), nn.Linear(out, 16))

        def forward(self, x):
            for _ in range(3):
                x = torch.tanh(self.lin(x))
            return x

    x = torch.randn(64, 16)
    for mode in ("region", "linear", "checkpoint"):
        for width in (16, 512):
            torch.manual_seed(0)
            model = Loop(width)
            laser_fx.compress(model, config=LaserConfig(mode=mode, granularity="block"),
                              example_inputs=(x,))
            model(x).sum().backward()
            rows = laser_fx.report(model).to_dict()["sites"]
            want = 3 * (64 * 16 * 4 + 64 * width * 4)
            assert sum(r["dense_bytes"] for r in rows) == want, (mode, width, rows)
