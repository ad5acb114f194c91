"""nn.TransformerEncoderLayer looped n times and Hugging Face ALBERT, compressed in place.

Issue 14: HF models needed torch.export, a compressed one then required ``attention_mask``
that the original treats as optional, ``eval()`` left dropout on (an eval forward of a
compressed ALBERT differed by 0.34), and ``laser_fx.analyze`` failed on export-captured
models.
"""

from __future__ import annotations

import copy

import pytest
import torch

import laser_fx
from laser_fx import LaserConfig

from ._helpers import assert_grads_equal, grads_of
from .looped_transformers import make_albert, make_looped, tokens_and_mask

EXACT = LaserConfig(energy=1.0, min_numel=0)
ALBERT_SITE = "encoder.albert_layer_groups.0"


def _case(kind: str, dropout: float = 0.1):
    """(model, input ids, padding mask, name of the mask keyword, mask value to pass, site)."""
    if kind == "albert":
        ids, mask = tokens_and_mask(vocab=40)
        return make_albert(dropout=dropout), ids, "attention_mask", mask, ALBERT_SITE
    ids, mask = tokens_and_mask()
    return make_looped(dropout=dropout), ids, "src_key_padding_mask", mask == 0, "layer"


def _out(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _loss(out) -> torch.Tensor:
    return _out(out).float().square().mean()


@pytest.fixture
def no_export(monkeypatch):
    """Any torch.export / fx capture during the test raises."""
    def refuse(*_a, **_k):
        raise AssertionError("compress captured the model (torch.export / fx) — it must not")

    monkeypatch.setattr(torch.export, "export", refuse)
    monkeypatch.setattr(torch.fx, "symbolic_trace", refuse)
    monkeypatch.setattr(torch.fx.Tracer, "trace", refuse)


@pytest.mark.parametrize("kind", ["looped", "albert"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_compress_without_export_and_mask_stays_optional(kind, with_mask, no_export):
    model, ids, key, mask, site = _case(kind)
    kwargs = {key: mask} if with_mask else None
    laser_fx.compress(model, example_inputs=(ids,), example_kwargs=kwargs)
    assert [s["name"] for s in laser_fx.report(model).to_dict()["sites"]] == [site]
    for call_kwargs in ({}, {key: mask}):  # the compressed model needs no mask either way
        torch.manual_seed(0)
        out = _out(model(ids, **call_kwargs))
        assert out.shape[:2] == ids.shape and out.requires_grad
        _loss(out).backward()


@pytest.mark.parametrize("kind", ["looped", "albert"])
def test_eval_forward_equals_uncompressed_eval_forward(kind):
    model, ids, key, mask, _ = _case(kind, dropout=0.1)
    ref = copy.deepcopy(model)
    laser_fx.compress(model, example_inputs=(ids,), example_kwargs={key: mask})
    model.eval()
    ref.eval()
    assert not any(m.training for m in model.modules())
    for grad in (False, True):  # a grad-enabled eval forward goes through the mechanism
        with torch.set_grad_enabled(grad):
            got, want = _out(model(ids, **{key: mask})), _out(ref(ids, **{key: mask}))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    model.train()  # and back: dropout on again, as in the original
    ref.train()
    torch.manual_seed(1)
    got = _out(model(ids, **{key: mask}))
    torch.manual_seed(1)
    want = _out(ref(ids, **{key: mask}))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.manual_seed(2)
    assert not torch.equal(_out(model(ids, **{key: mask})), got), "train(): dropout is off"


@pytest.mark.parametrize("kind", ["looped", "albert"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_exact_at_energy_one(kind, dropout):
    model, ids, key, mask, site = _case(kind, dropout=dropout)
    ref = copy.deepcopy(model)
    laser_fx.compress(model, config=EXACT, example_inputs=(ids,), example_kwargs={key: mask})
    for step in range(2):  # the second step runs on warm trackers
        for m in (ref, model):
            m.zero_grad()
            torch.manual_seed(step)  # the same dropout masks (replayed in the recompute)
            _loss(m(ids, **{key: mask})).backward()
        assert_grads_equal(grads_of(model), grads_of(ref))
    row = laser_fx.report(model).to_dict()["sites"][0]
    # energy=1.0 keeps these full-rank inputs as they are: the recompute is what is tested
    assert row["name"] == site and row["calls"] == row["grad_uses"] and row["stored_bytes"] > 0


def test_analyze_runs_on_albert_and_leaves_it_uncompressed():
    model, ids, key, mask, site = _case("albert", dropout=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    an = laser_fx.analyze(model, (ids,), example_kwargs={key: mask}, ks=(1, 4, 16))
    keys = [s.key for s in an.sites]
    assert f"{site}[0]" in keys, keys
    top = next(s for s in an.sites if s.key == f"{site}[0]")
    assert len(top.steps) == model.config.num_hidden_layers and top.width == 32
    assert an.memory[site]["stored_bytes"] < an.memory[site]["dense_bytes"]
    assert not laser_fx.is_compressed(model), "analyze left the user's model compressed"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    laser_fx.compress(model, example_inputs=(ids,), example_kwargs={key: mask})  # still possible
