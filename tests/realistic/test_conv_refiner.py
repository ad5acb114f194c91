"""A recurrent Conv2d refiner: the shared conv and the conv + BatchNorm block compress.

Issue 14: a recurrent Conv2d refiner used to be refused ("conv ops are compressed through
their block"), and BatchNorm statistics were advanced by compress() and twice per step by the
recompute.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import laser_fx
from laser_fx import LaserConfig

from ._helpers import assert_grads_equal, grads_of
from .conv_refiner import make_images, make_refiner

EXACT = LaserConfig(energy=1.0, min_numel=0)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def test_shared_conv_and_block_are_sites_and_compress():
    model, x = make_refiner(), make_images()
    sites = {s.name: s for s in laser_fx.find_sites(model, (x,))}
    assert (sites["step"].kind, sites["step"].grad_uses, sites["step"].block) == ("conv", 3, None)
    assert (sites["block"].kind, sites["block"].grad_uses) == ("module", 3)
    assert sites["block.conv1"].block == "block"
    laser_fx.compress(model, example_inputs=(x,))  # no "conv ops ... through their block"
    names = sorted(s["name"] for s in laser_fx.report(model).to_dict()["sites"])
    assert names == ["block", "step"]
    assert isinstance(model.step, laser_fx.SiteWrapper) and isinstance(model.block,
                                                                         laser_fx.SiteWrapper)
    _loss(model(x)).backward()
    assert model.step.weight.grad is not None and model.block.bn.weight.grad is not None


def test_compress_leaves_batchnorm_statistics_alone():
    model, x = make_refiner(), make_images()
    bn = model.block.bn
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    laser_fx.compress(model, example_inputs=(x,))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), f"compress() changed BatchNorm {k}"


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), steps=st.integers(2, 4))
def test_gradients_and_batchnorm_statistics_equal_uncompressed(seed, steps):
    model, x = make_refiner(seed, steps=steps), make_images(seed=seed)
    ref = copy.deepcopy(model)
    laser_fx.compress(model, config=EXACT, example_inputs=(x,))
    for m in (ref, model):
        _loss(m(x)).backward()  # one training step: forward (BN updates `steps` times) + backward
    assert_grads_equal(grads_of(model), grads_of(ref))
    got, want = model.state_dict(), ref.state_dict()
    assert list(got) == list(want)
    for k in ("block.bn.running_mean", "block.bn.running_var", "block.bn.num_batches_tracked"):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0,
                                   msg=lambda m, k=k: f"{k} after one step: {m}")
    assert int(got["block.bn.num_batches_tracked"]) == steps


@pytest.mark.filterwarnings("ignore:laser_fx. the re-run of")  # vjp refuses BatchNorm's update
def test_compiled_fullgraph_updates_batchnorm_statistics_once_and_matches():
    # torch.compile(fullgraph=True): both shared sites (a Conv2d, a conv + BatchNorm block)
    # are traced checkpoints; the traced forward updates the running statistics in the graph
    # and the re-run in backward must not update them again
    torch._dynamo.reset()
    model, images = make_refiner(seed=3), make_images(batch=4, seed=3)
    plain = copy.deepcopy(model)
    cfg = LaserConfig(energy=1.0, min_numel=0, compile_backend="aot_eager")
    comp = laser_fx.compress(copy.deepcopy(model), config=cfg, example_inputs=(images,))
    compiled = torch.compile(comp, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        for m in (comp, plain):
            m.zero_grad(set_to_none=True)
        _loss(compiled(images)).backward()
        _loss(plain(images)).backward()
        assert_grads_equal(grads_of(comp), grads_of(plain), rtol=1e-4, atol=1e-5)
    for (name, b_c), (_, b_p) in zip(comp.named_buffers(), plain.named_buffers(), strict=True):
        torch.testing.assert_close(b_c, b_p, rtol=1e-5, atol=1e-6, msg=name)
    stores = [w for w in comp.modules() if isinstance(w, laser_fx.SiteWrapper)]
    assert len(stores) == 2 and all(w.stats.calls for w in stores)
    torch._dynamo.reset()
