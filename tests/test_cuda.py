"""Compressed models on a GPU: trackers live on the model's device, from compress(), from
``.to()`` and from a loaded state. Skipped where no CUDA device is present (CI); run on a GPU
machine with ``pytest tests/test_cuda.py``."""

from __future__ import annotations

import copy

import pytest
import torch

import laser_fx
from laser_fx import LaserConfig
from laser_fx.testing.zoo import ZOO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = [("trm_attn", m) for m in ("auto", "linear", "region", "checkpoint")] + [
    ("looped_transformer", "auto"), ("unrolled_rnn", "linear")]


def _loss(out):
    return out.float().pow(2).mean()


def _cuda(tree):
    return tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in tree)


def _trackers_on_cuda(cmodel) -> bool:
    trackers = [m for m in cmodel.modules() if isinstance(m, laser_fx.SubspaceTracker)]
    return bool(trackers) and all(b.is_cuda for t in trackers for b in t.buffers())


@pytest.mark.parametrize(("name", "mode"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_compress_a_cuda_model_lossless(name, mode):
    model, inputs = ZOO[name]()
    model, inputs = model.cuda(), _cuda(inputs)
    cmodel = laser_fx.compress(model, config=LaserConfig(energy=1.0, mode=mode, min_numel=0),
                               example_inputs=inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(2):
        got = torch.autograd.grad(_loss(cmodel(*inputs)), params)
        want = torch.autograd.grad(_loss(model(*inputs)), params)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)
    assert _trackers_on_cuda(cmodel)


def test_compress_on_cpu_then_move_and_load_a_cpu_state():
    model, inputs = ZOO["trm_attn"]()
    cmodel = laser_fx.compress(model, example_inputs=inputs).cuda()
    inputs = _cuda(inputs)
    _loss(cmodel(*inputs)).backward()  # slots are created lazily, on the GPU
    assert _trackers_on_cuda(cmodel)
    state = {k: v.cpu() for k, v in cmodel.state_dict().items()}
    fresh, _ = ZOO["trm_attn"]()
    other = laser_fx.compress(fresh, example_inputs=ZOO["trm_attn"]()[1]).cuda()
    other.load_state_dict(state)  # slots re-created by the load follow the model to the GPU
    assert _trackers_on_cuda(other)
    twin = copy.deepcopy(cmodel)
    torch.testing.assert_close(other(*inputs), twin(*inputs), rtol=1e-5, atol=1e-6)
