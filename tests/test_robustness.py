"""Bad input gets a clear library error; checkpoints of every mechanism round-trip exactly.

What is pinned here:

* `compress` on bad input raises a `LaserFxError` subclass whose message names what was wrong
  and what to do, never a raw torch error;
* models that whole-model capture refused (data-dependent loops, code fx cannot trace)
  compress, since `compress` only runs the model eagerly;
* a compressed model called with inputs the original model rejects raises the SAME error as
  the original (never a silently wrong result);
* ``torch.save(model.state_dict())`` of a compressed model has exactly the original keys,
  loads with ``torch.load(weights_only=True)`` strictly into a compressed or an uncompressed
  model (also with ``assign=True``), and the loaded model's next step equals that of a model
  compressed from the same weights, for each mechanism (`tests/test_api.py` covers
  ``mode="auto"``). Tracker state is not in the state dict: a tracker rebuilds its basis.
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import laser_fx
from laser_fx import ConfigError, LaserConfig, LaserFxError, NoSitesError
from laser_fx.testing.zoo import ZOO, LoopedTransformer, TRMLike

MECHANISMS = ("linear", "region", "checkpoint")


def _loss(out: torch.Tensor) -> torch.Tensor:
    # not mean(out²): a LayerNorm output's mean square is ~1 whatever the weights, so that
    # loss has ~0 gradients and any gradient error would hide under atol
    return out.float().cumsum(-1).pow(2).mean()


def _small_trm(seed: int = 0) -> tuple[TRMLike, tuple[torch.Tensor]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TRMLike(d=32, seq=8, n=2, T=2)
    tokens = torch.randint(
        0, model.vocab, (2, model.seq), generator=torch.Generator().manual_seed(seed)
    )
    return model, (tokens,)


class _Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(h) + x)


class _TwoInputs(nn.Module):
    """A cell looped 3 times; two required inputs (x, h)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = _Cell()

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            h = self.cell(x, h)
        return h


class _Untraceable(nn.Module):
    """fx cannot trace it (int() of a traced value); an eager probe run does not care."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for _ in range(3):
            h = self.lin(h)
        return h[: int(x.shape[0] // 2 + 1)]


class _NoGradLoop(nn.Module):
    """A shared linear whose repeated calls all run under no_grad (an inference refiner)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for _ in range(3):
                x = self.lin(x)
        return x


def _x8() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


def _trm() -> TRMLike:
    """A new model per case: compress modifies the model it is given in place."""
    return _small_trm()[0]


# (id, call producing the error, expected type, regex the message must match)
_TRM_IN = _small_trm()[1]
BAD_COMPRESS = [
    (
        "not-a-module-function",
        lambda: laser_fx.compress(lambda t: t),
        ConfigError,
        "expects an nn.Module",
    ),
    (
        "not-a-module-class",
        lambda: laser_fx.compress(TRMLike),
        ConfigError,
        "expects an nn.Module, got type",
    ),
    ("not-a-module-tensor", lambda: laser_fx.compress(torch.ones(3)), ConfigError, "got Tensor"),
    (
        "no-example-inputs",
        lambda: laser_fx.compress(_Untraceable()),
        ConfigError,
        r"missing a required argument: 'x'.*pass example_inputs",
    ),
    (
        "no-sites",
        lambda: laser_fx.compress(*ZOO["plain_mlp"]()[:1], example_inputs=ZOO["plain_mlp"]()[1]),
        NoSitesError,
        "no weight-shared",
    ),
    (
        "no-grad-use",
        lambda: laser_fx.compress(_NoGradLoop(), example_inputs=(_x8(),)),
        NoSitesError,
        r"lin.*no call with grad enabled",
    ),
    (
        "sites-empty-list",
        lambda: laser_fx.compress(_trm(), sites=[], example_inputs=_TRM_IN),
        NoSitesError,
        r"Nothing to compress in TRMLike: `sites` selected none of the sites found \(\['net', ",
    ),
    (
        "sites-callable-none",
        lambda: laser_fx.compress(_trm(), sites=lambda s: False, example_inputs=_TRM_IN),
        NoSitesError,
        "Nothing to compress",
    ),
    (
        "sites-unknown-name",
        lambda: laser_fx.compress(_trm(), sites=["net.zzz"], example_inputs=_TRM_IN),
        ConfigError,
        r"no site called \['net.zzz'\].*Sites:",
    ),
    (
        "sites-regex-nothing",
        lambda: laser_fx.compress(_trm(), sites=r"zzz.*", example_inputs=_TRM_IN),
        ConfigError,
        "matches no site",
    ),
    (
        "sites-list-of-ints",
        lambda: laser_fx.compress(_trm(), sites=[1, 2], example_inputs=_TRM_IN),
        ConfigError,
        "must be 'auto', a list of site names",
    ),
    (
        "exclude-unknown-name",
        lambda: laser_fx.compress(_trm(), exclude=["nope"], example_inputs=_TRM_IN),
        ConfigError,
        r"`exclude` names no site called \['nope'\]",
    ),
    (
        "exclude-regex-nothing",
        lambda: laser_fx.compress(_trm(), exclude="zzz", example_inputs=_TRM_IN),
        ConfigError,
        "`exclude` regex 'zzz' matches no site",
    ),
    (
        "exclude-everything",
        lambda: laser_fx.compress(_trm(), exclude="auto", example_inputs=_TRM_IN),
        NoSitesError,
        "excluded",
    ),
    (
        "config-energy-above-1",
        lambda: LaserConfig(energy=1.5),
        ConfigError,
        r"`energy` must be a number in \(0, 1\]",
    ),
    ("config-energy-nan", lambda: LaserConfig(energy=float("nan")), ConfigError, "`energy`"),
    (
        "config-rank-0",
        lambda: LaserConfig(rank=0),
        ConfigError,
        "`rank` must be None or an integer >= 1",
    ),
    ("config-mode-typo", lambda: LaserConfig(mode="Linear"), ConfigError, "`mode` must be one of"),
    (
        "config-fidelity-above-energy",
        lambda: LaserConfig(energy=0.9, fidelity=0.95),
        ConfigError,
        "must not exceed `energy`",
    ),
    (
        "config-as-dict",
        lambda: laser_fx.compress(_trm(), config={"energy": 0.9}, example_inputs=_TRM_IN),
        ConfigError,
        "must be a LaserConfig",
    ),
    (
        "inputs-too-many",
        lambda: laser_fx.compress(_TwoInputs(), example_inputs=(_x8(), _x8(), _x8())),
        LaserFxError,
        "too many positional arguments",
    ),
    (
        "inputs-wrong-dtype",
        lambda: laser_fx.compress(_trm(), example_inputs=(_TRM_IN[0].float(),)),
        ConfigError,
        r"(?s)TRMLike on the example inputs failed.*indices.*Pass example_inputs",
    ),
]


@pytest.mark.parametrize(
    ("case", "make", "exc", "match"), BAD_COMPRESS, ids=[c[0] for c in BAD_COMPRESS]
)
def test_bad_input_raises_library_error(case, make, exc, match):
    with pytest.raises(exc, match=match) as info:
        make()
    assert isinstance(info.value, LaserFxError), type(info.value)
    assert type(info.value).__module__.startswith("laser_fx"), type(info.value)


# Inputs that do not match the forward's signature are an argument error (ConfigError): the model
# itself is capturable. Today they surface as "Could not capture ..." after fx AND export failed.
SIGNATURE = [
    ("too-few", dict(example_inputs=(_x8(),)), "missing a required argument: 'h'"),
    (
        "unknown-kwarg",
        dict(example_inputs=(_x8(), _x8()), example_kwargs={"z": _x8()}),
        "unexpected keyword",
    ),
    (
        "duplicate-kwarg",
        dict(example_inputs=(_x8(), _x8()), example_kwargs={"h": _x8()}),
        "multiple values",
    ),
    ("dict-as-positional", dict(example_inputs={"x": _x8(), "h": _x8()}), "example_kwargs"),
]


# Regression: compress binds example inputs to the forward's signature before tracing.
@pytest.mark.parametrize(("case", "kwargs", "match"), SIGNATURE, ids=[c[0] for c in SIGNATURE])
def test_example_inputs_not_matching_signature_is_config_error(case, kwargs, match):
    with pytest.raises(ConfigError, match=rf"(?s){match}.*example_inputs|example_inputs.*{match}"):
        laser_fx.compress(_TwoInputs(), **kwargs)


# Regression: a per_site regex that matches no site used to be silently ignored.
def test_per_site_regex_matching_nothing_is_an_error():
    cfg = LaserConfig(per_site={r"net\.blocks\.0\.mlp\.gat": LaserConfig(rank=2)})  # typo: no 'e'
    with pytest.raises(ConfigError, match=r"per_site.*no site"):
        laser_fx.compress(_trm(), config=cfg, example_inputs=_TRM_IN)


@pytest.mark.parametrize("mode", ("auto", *MECHANISMS))
def test_compress_twice_is_config_error_and_strip_recompresses(mode):
    model, inputs = _small_trm()
    cfg = LaserConfig(mode=mode, min_numel=0)
    cmodel = laser_fx.compress(model, config=cfg, example_inputs=inputs)
    with pytest.raises(ConfigError, match="already compressed.*strip"):
        laser_fx.compress(cmodel, config=cfg, example_inputs=inputs)
    again = laser_fx.compress(laser_fx.strip(cmodel), config=cfg, example_inputs=inputs)
    torch.testing.assert_close(again(*inputs), model(*inputs), rtol=0, atol=0)


def _same_error(fn_a, fn_b) -> tuple[type, str]:
    """Both calls raise; same exception type and message. Returns them."""
    with pytest.raises(Exception) as want:
        fn_a()
    with pytest.raises(Exception) as got:
        fn_b()
    assert type(got.value) is type(want.value), (got.value, want.value)
    assert str(got.value) == str(want.value)
    return type(got.value), str(got.value)


CALLS = [
    # LoopedTransformer takes float (B, L, d): d+1 features
    ("looped-width+1", "looped", lambda: (torch.randn(2, 8, 33),), "65|33"),
    ("trm-token-out-of-range", "trm", lambda: (torch.full((2, 8), 99),), "index out of range"),
    ("trm-float-tokens", "trm", lambda: (torch.zeros(2, 8),), "indices"),
    ("two-inputs-h-width+1", "two", lambda: (_x8(), torch.randn(4, 9)), "cannot be multiplied"),
]


def _model_for(kind: str):
    if kind == "looped":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m = LoopedTransformer(d=32, loops=3)
        return m, (torch.randn(2, 8, 32),)
    if kind == "trm":
        return _small_trm()
    return _TwoInputs(), (_x8(), _x8())


@pytest.mark.parametrize("mode", MECHANISMS)
@pytest.mark.parametrize(("case", "kind", "make", "match"), CALLS, ids=[c[0] for c in CALLS])
def test_call_with_wrong_inputs_fails_like_the_original(case, kind, make, match, mode):
    model, inputs = _model_for(kind)
    cmodel = laser_fx.compress(
        model, config=LaserConfig(mode=mode, min_numel=0), example_inputs=inputs
    )
    bad = make()
    for grad in (True, False):  # the compressed path and the plain path
        with torch.set_grad_enabled(grad):
            _, msg = _same_error(lambda: model(*bad), lambda: cmodel(*bad))
    assert re.search(match, msg), msg
    # a failed call leaves the model usable
    torch.testing.assert_close(cmodel(*inputs), model(*inputs), rtol=0, atol=0)


def test_call_with_wrong_arity_is_type_error():
    model, inputs = _small_trm()
    cmodel = laser_fx.compress(model, example_inputs=inputs)
    with pytest.raises(TypeError, match="positional"):
        cmodel(inputs[0], inputs[0])
    with pytest.raises(TypeError, match="unexpected keyword"):
        cmodel(toks=inputs[0])


# ------------------------------------------------------------------ checkpoints, per mechanism


def _params(m: nn.Module) -> list[torch.Tensor]:
    return [p for p in m.parameters() if p.requires_grad]


def _step_grads(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(_loss(m(x)), _params(m))


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
@pytest.mark.parametrize("mode", MECHANISMS)
def test_state_dict_round_trip_reproduces_next_step(mode, assign):
    model, inputs = _small_trm()
    keys = list(model.state_dict())
    names = [k for k, _ in model.named_parameters()]
    cfg = LaserConfig(energy=0.9, mode=mode, min_numel=0)
    a = laser_fx.compress(model, config=cfg, example_inputs=inputs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(2):  # warm trackers, weights moved
        x = torch.randint(0, 12, (2, 8), generator=torch.Generator().manual_seed(i + 1))
        opt.zero_grad()
        _loss(a(x)).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert list(state) == keys  # exactly the user's keys: no wrapper prefix, no tracker state
    # into a fresh compressed model (other weights: everything must come from the checkpoint)
    b = laser_fx.compress(_small_trm(seed=5)[0], config=cfg, example_inputs=inputs)
    b.load_state_dict(state, assign=assign)
    # and into an uncompressed one, then compressed from those weights: both start cold
    plain = _small_trm(seed=6)[0]
    plain.load_state_dict(state, assign=assign)
    c = laser_fx.compress(copy.deepcopy(plain), config=cfg, example_inputs=inputs)
    if assign:  # the compressed model holds the loaded tensors themselves (not copies)
        assert [p.data_ptr() for p in b.parameters()] == [state[k].data_ptr() for k in names]
    x = torch.randint(0, 12, (3, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():  # (a grad-enabled call would feed b's trackers, not c's)
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
        torch.testing.assert_close(plain(x), a(x), rtol=0, atol=0)
    gb, gc = _step_grads(b, x), _step_grads(c, x)
    for u, v in zip(gb, gc, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    # the warm model's next step and the reloaded (cold) one's are both close to the exact
    # step of the loaded weights (energy 0.9: each stored tensor keeps 90% of its energy);
    # the warm one's bases are not reloaded, so the two differ
    exact = torch.cat([g.flatten() for g in _step_grads(plain, x)])
    for name, m in (("warm", a), ("reloaded", b)):
        cos = F.cosine_similarity(torch.cat([g.flatten() for g in _step_grads(m, x)]), exact,
                                  dim=0)
        assert cos > 0.85, f"{mode}: {name} vs exact gradient cosine {float(cos):.4f}"


@pytest.mark.parametrize("mode", MECHANISMS)
def test_cold_checkpoint_loads_into_warm_model(mode):
    # The old regression (slot trackers missing from a cold state) cannot happen any more:
    # trackers are not in the state dict. What stays pinned: a strict load into a warm
    # compressed model restores the weights, and its forward is the original's.
    model, inputs = _small_trm()
    reference = copy.deepcopy(model)
    cmodel = laser_fx.compress(
        model, config=LaserConfig(mode=mode, min_numel=0), example_inputs=inputs
    )
    cold = copy.deepcopy(cmodel.state_dict())
    opt = torch.optim.SGD(cmodel.parameters(), lr=0.1)
    _loss(cmodel(*inputs)).backward()
    opt.step()
    assert not torch.equal(cmodel(*inputs), reference(*inputs))  # control: weights moved
    cmodel.load_state_dict(cold)  # strict
    torch.testing.assert_close(cmodel(*inputs), reference(*inputs), rtol=0, atol=0)
    _loss(cmodel(*inputs)).backward()  # and it still trains


def test_models_whole_model_capture_refused_now_compress():
    # Regression (issue 14): a data-dependent loop and code fx cannot trace used to raise
    # TraceError; the probe runs the model eagerly, so both compress and stay exact.
    for model, inputs in [ZOO["data_dependent_loop"](), (_Untraceable(), (_x8(),))]:
        want = model(*inputs)
        laser_fx.compress(model, example_inputs=inputs)
        assert laser_fx.is_compressed(model)
        torch.testing.assert_close(model(*inputs), want, rtol=0, atol=0)
        model(*inputs).sum().backward()
