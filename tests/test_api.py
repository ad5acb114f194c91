"""compress / report / strip: the one-call API over the whole zoo."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F

import laser_fx
from laser_fx import ConfigError, LaserConfig, NoSitesError
from laser_fx.testing.zoo import ZOO, WEIGHT_SHARED, TRMLike

MODES = ("auto", "linear", "region", "checkpoint")
# grad_modes has no block and recursive_conv no linear: those pairs have nothing to compress.
_NOTHING = {("grad_modes", "region"), ("grad_modes", "checkpoint"), ("recursive_conv", "linear")}
CASES = [(name, mode) for name in WEIGHT_SHARED for mode in MODES if (name, mode) not in _NOTHING]


def _loss(out):
    return out.float().pow(2).mean()


def _grads(model, inputs, params):
    return torch.autograd.grad(_loss(model(*inputs)), params)


def _flat(gs):
    return torch.cat([g.flatten() for g in gs])


@pytest.mark.parametrize(("name", "mode"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_forward_equal_and_lossless_gradients(name, mode):
    model, inputs = ZOO[name]()
    cmodel = laser_fx.compress(
        model, config=LaserConfig(energy=1.0, mode=mode, min_numel=0), example_inputs=inputs
    )
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(2):  # second step runs on warm trackers
        torch.testing.assert_close(cmodel(*inputs), model(*inputs), rtol=0, atol=0)
        for got, want in zip(_grads(cmodel, inputs, params), _grads(model, inputs, params)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("name", "mode"), [(n, m) for n, m in CASES if m == "auto"],
                         ids=lambda v: str(v))
def test_strip_round_trip_equals_original(name, mode):
    model, inputs = ZOO[name]()
    cmodel = laser_fx.compress(model, example_inputs=inputs)
    plain = laser_fx.strip(cmodel)
    assert not laser_fx.is_compressed(plain)
    torch.testing.assert_close(plain(*inputs), model(*inputs), rtol=0, atol=0)
    # same parameter objects: training one trains the other
    assert {id(p) for p in plain.parameters()} == {id(p) for p in model.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    for got, want in zip(_grads(plain, inputs, params), _grads(model, inputs, params)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_original_model_is_not_modified_and_parameters_are_shared():
    model, inputs = ZOO["trm_attn"]()
    before = copy.deepcopy(model.state_dict())
    modules_before = [n for n, _ in model.named_modules()]
    cmodel = laser_fx.compress(model, example_inputs=inputs)
    _loss(cmodel(*inputs)).backward()
    assert [n for n, _ in model.named_modules()] == modules_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    cparams = {id(p) for p in cmodel.parameters()}
    assert all(id(p) in cparams for p in model.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _fixed_rank_model():
    model, inputs = ZOO["trm_attn"](batch=4)
    return model, inputs, LaserConfig(rank=4, min_numel=0, mode="linear")


def test_fixed_rank_stored_bytes_match_formula():
    model, inputs, cfg = _fixed_rank_model()
    cmodel = laser_fx.compress(model, config=cfg, example_inputs=inputs)
    _loss(cmodel(*inputs)).backward()
    rep = laser_fx.report(cmodel).to_dict()
    tokens = inputs[0].numel()
    for s in rep["sites"]:
        # per grad use: N x k fp32 coefficients and the row mean (width); plus the current
        # basis (width x k)
        assert s["rank"] == 4
        want = s["grad_uses"] * (tokens * 4 + s["width"]) * 4 + s["width"] * 4 * 4
        assert s["stored_bytes"] == want, (s["name"], s["stored_bytes"], want)
        assert s["dense_bytes"] == s["grad_uses"] * tokens * s["width"] * 4


def test_state_dict_round_trip_reproduces_next_step():
    model, inputs = ZOO["trm_attn"]()
    cfg = LaserConfig(energy=0.9)
    a = laser_fx.compress(model, config=cfg, example_inputs=inputs)
    for _ in range(2):
        _loss(a(*inputs)).backward()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b = laser_fx.compress(copy.deepcopy(model), config=cfg, example_inputs=inputs)
    b.load_state_dict(state)
    pa = [p for p in a.parameters() if p.requires_grad]
    pb = [p for p in b.parameters() if p.requires_grad]
    for ga, gb in zip(_grads(a, inputs, pa), _grads(b, inputs, pb)):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    assert laser_fx.report(a).to_dict()["sites"] == laser_fx.report(b).to_dict()["sites"]


def test_deepcopy_carries_tracker_state():
    model, inputs = ZOO["looped_transformer"]()
    a = laser_fx.compress(model, example_inputs=inputs)
    _loss(a(*inputs)).backward()
    b = copy.deepcopy(a)
    sa, sb = a.laser_fx.state_dict(), b.laser_fx.state_dict()
    assert sa.keys() == sb.keys() and sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(b(*inputs), a(*inputs), rtol=0, atol=0)
    assert laser_fx.strip(b) is not laser_fx.strip(a)


@pytest.mark.parametrize("mode", ["linear", "region", "checkpoint"])
def test_printed_code_names_each_site(mode):
    model, inputs = ZOO["trm_attn"]()
    cmodel = laser_fx.compress(model, config=LaserConfig(mode=mode), example_inputs=inputs)
    code = cmodel.code
    for s in laser_fx.report(cmodel).to_dict()["sites"]:
        key = s["name"].replace(".", "_")
        calls = re.findall(rf"self\.laser_fx\.sites\.{key}\(", code)
        assert len(calls) == s["grad_uses"], (s["name"], len(calls))


def test_eval_and_no_grad_do_no_tracker_work():
    model, inputs = ZOO["trm_attn"]()
    cmodel = laser_fx.compress(model, example_inputs=inputs)
    with torch.no_grad():
        cmodel(*inputs)
    cmodel.eval()
    _loss(cmodel(*inputs)).backward()
    assert all(s["calls"] == 0 for s in laser_fx.report(cmodel).to_dict()["sites"])
    cmodel.train()
    _loss(cmodel(*inputs)).backward()
    assert all(s["calls"] > 0 for s in laser_fx.report(cmodel).to_dict()["sites"])


def test_compress_twice_is_a_clear_error():
    model, inputs = ZOO["trm_attn"]()
    cmodel = laser_fx.compress(model, example_inputs=inputs)
    with pytest.raises(ConfigError, match="already compressed.*strip"):
        laser_fx.compress(cmodel, example_inputs=inputs)


SELECTORS = [
    ("names", ["net.blocks.0.mix.q", "net.blocks.1.mlp.down"], {"net.blocks.0.mix.q", "net.blocks.1.mlp.down"}),
    ("regex", r"net\.blocks\.0\.mlp\..*", {"net.blocks.0.mlp.gate", "net.blocks.0.mlp.up", "net.blocks.0.mlp.down"}),
    ("callable", lambda s: s.kind == "linear" and s.name.endswith(".o"), {"net.blocks.0.mix.o", "net.blocks.1.mix.o"}),
]


@pytest.mark.parametrize(("how", "spec", "want"), SELECTORS, ids=[c[0] for c in SELECTORS])
def test_site_selectors(how, spec, want):
    model, inputs = ZOO["trm_attn"]()
    cmodel = laser_fx.compress(model, spec, config=LaserConfig(mode="linear"), example_inputs=inputs)
    assert {s["name"] for s in laser_fx.report(cmodel).to_dict()["sites"]} == want


def test_exclude_and_per_site_config():
    model, inputs = ZOO["trm_attn"]()
    cfg = LaserConfig(mode="linear", per_site={r".*\.mlp\.down": LaserConfig(rank=2, mode="linear")})
    cmodel = laser_fx.compress(model, config=cfg, exclude=r".*\.mix\..*", example_inputs=inputs)
    _loss(cmodel(*inputs)).backward()
    rep = laser_fx.report(cmodel).to_dict()
    names = {s["name"] for s in rep["sites"]}
    assert names == {f"net.blocks.{i}.mlp.{p}" for i in (0, 1) for p in ("gate", "up", "down")}
    assert all(s["rank"] == 2 for s in rep["sites"] if s["name"].endswith("down"))
    assert rep["skipped"]["net.blocks.0.mix.q"] == "excluded"


BAD = [
    ("unknown-name", dict(sites=["net.nope"]), ConfigError, r"no site called \['net.nope'\].*Sites: \["),
    ("regex-matches-nothing", dict(sites=r"foo.*"), ConfigError, "matches no site"),
    ("bad-regex", dict(sites="net(["), ConfigError, "regex .* is invalid"),
    ("bad-selector-type", dict(sites=3), ConfigError, "must be 'auto', a list"),
    ("bad-config-type", dict(config={"energy": 0.9}), ConfigError, "must be a LaserConfig"),
    ("block-mode-on-op", dict(sites=["net.blocks.0.mix.q"], config=LaserConfig(mode="region")),
     ConfigError, "Select its block"),
]


@pytest.mark.parametrize(("case", "kwargs", "exc", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_errors(case, kwargs, exc, match):
    model, inputs = ZOO["trm_attn"]()
    with pytest.raises(exc, match=match):
        laser_fx.compress(model, example_inputs=inputs, **kwargs)


def test_no_sites_error_names_the_fix():
    model, inputs = ZOO["plain_mlp"]()
    with pytest.raises(NoSitesError, match=r"compress the loop body module"):
        laser_fx.compress(model, example_inputs=inputs)
    with pytest.raises(ConfigError, match="expects an nn.Module"):
        laser_fx.compress(lambda x: x)


def test_report_and_strip_reject_plain_modules():
    model, _ = ZOO["trm_attn"]()
    for fn in (laser_fx.report, laser_fx.strip):
        with pytest.raises(ConfigError, match="returned by laser_fx.compress"):
            fn(model)


def test_report_table_and_dict():
    model, inputs = ZOO["trm_attn"]()
    cmodel = laser_fx.compress(model, example_inputs=inputs)
    _loss(cmodel(*inputs)).backward()
    rep = laser_fx.report(cmodel)
    d = rep.to_dict()
    keys = {"name", "uses", "grad_uses", "width", "rank", "fidelity", "resets", "stored_bytes",
            "dense_bytes"}
    assert d["sites"] and all(keys <= s.keys() for s in d["sites"])
    assert 0 < d["totals"]["stored_bytes"] < d["totals"]["dense_bytes"]
    text = str(rep)
    assert "net" in text and "stored/dense" in text


# --- the figures on the TRM-like model (D=128, n=6, T=3, 32 x 64 = 2048 tokens) ---

@pytest.fixture(scope="module")
def big_trm():
    torch.manual_seed(0)
    model = TRMLike(d=128, seq=64, n=6, T=3, mixer="attn")
    tokens = torch.randint(0, model.vocab, (32, 64))
    base = laser_fx.measure_activation_memory(model, (tokens,), _loss)
    model.zero_grad(set_to_none=True)
    return model, tokens, base


@pytest.mark.parametrize(("what", "cfg", "bound"), [
    ("rank8", LaserConfig(rank=8), 0.40),
    ("default", LaserConfig(), 0.40),
], ids=["rank8", "default"])
def test_trm_activation_memory_ratio(big_trm, what, cfg, bound):
    model, tokens, base = big_trm
    cmodel = laser_fx.compress(model, config=cfg, example_inputs=(tokens,))
    _loss(cmodel(tokens)).backward()  # warm bases
    got = laser_fx.measure_activation_memory(cmodel, (tokens,), _loss)
    model.zero_grad(set_to_none=True)
    ratio = got.ratio_to(base)
    print(f"\nTRM D=128 n=6 T=3 2048 tokens, {what}: activation memory {ratio:.3f}x "
          f"({got.after_forward} / {base.after_forward} bytes)")
    assert ratio <= bound, f"{what}: {ratio:.3f}x > {bound}x"


def test_trm_default_gradient_cosine(big_trm):
    model, tokens, _ = big_trm
    params = [p for p in model.parameters() if p.requires_grad]
    cmodel = laser_fx.compress(model, example_inputs=(tokens,))
    _loss(cmodel(tokens)).backward()
    model.zero_grad(set_to_none=True)
    cos = F.cosine_similarity(_flat(_grads(cmodel, (tokens,), params)),
                              _flat(_grads(model, (tokens,), params)), dim=0)
    assert cos >= 0.99, f"gradient cosine {cos:.5f} < 0.99"


def test_training_smoke_default_laser_matches_loss():
    """50 AdamW steps on a learnable token task: LASER ends within 10% of uncompressed."""
    finals = {}
    for arm in ("base", "laser"):
        model, _ = ZOO["trm_attn"](seed=1)
        g = torch.Generator().manual_seed(0)
        x0 = torch.randint(0, model.vocab, (16, model.seq), generator=g)
        run = laser_fx.compress(model, example_inputs=(x0,)) if arm == "laser" else model
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(50):
            x = torch.randint(0, model.vocab, (16, model.seq), generator=g)
            target = (x + 1) % model.vocab  # learnable: next token id
            loss = F.cross_entropy(run(x).flatten(0, 1), target.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finals[arm] = loss.item()
    assert finals["base"] < 2.0, finals  # the task was learned at all
    assert abs(finals["laser"] - finals["base"]) <= 0.10 * finals["base"], finals
