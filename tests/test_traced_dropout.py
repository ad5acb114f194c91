"""Dropout inside a traced checkpoint (`laser_fx.ops._dropout`).

Under ``torch.compile`` a block's ``F.dropout`` calls (``nn.Dropout`` modules, or called
directly) draw masks from a per-call seed, which the record keeps, so the backward re-run
(plain, or the fused vjp graph) draws the same masks. Pinned here: no graph break, the
gradients of an uncompressed model run with the same masks (energy 1.0, over several steps
so the fused graph takes over), dropout really active, and the masks' law (Hypothesis).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from traced_helpers import BACKEND
from traced_helpers import cumsum_loss as _loss

import laser_fx
from laser_fx import LaserConfig, SiteWrapper
from laser_fx.ops._dropout import SeededDropout, attention, dropout_mask, seed

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class _DropBlock(nn.Module):
    """Two dropouts per call: a module, and a direct ``F.dropout`` call."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(0.3)

    def forward(self, h: torch.Tensor, inject: torch.Tensor) -> torch.Tensor:
        a = self.drop(F.gelu(self.up(h + inject)))
        return h + F.dropout(self.down(a), 0.2, self.training)


class _Refiner(nn.Module):
    def __init__(self, steps: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.block = _DropBlock()
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.inp(x)
        h = u
        for _ in range(self.steps):
            h = self.block(h, u)
        return h


def _same_masks(model: _Refiner, x: torch.Tensor) -> torch.Tensor:
    """``model`` uncompressed and eager, each block call with the masks a traced call
    draws: a seed from the global generator per call, in order."""
    u = model.inp(x)
    h = u
    for _ in range(model.steps):
        with SeededDropout(seed=seed(0)):
            h = model.block(h, u)
    return h


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


_INDUCTOR = pytest.mark.skipif(os.environ.get("LASER_FX_TEST_INDUCTOR") != "1",
                               reason="inductor is opt-in (LASER_FX_TEST_INDUCTOR=1)")


@pytest.mark.parametrize(("energy", "backend"), [
    (1.0, BACKEND), (0.9, BACKEND), pytest.param(1.0, "inductor", marks=_INDUCTOR)])
def test_dropout_blocks_trace_and_the_rerun_replays_their_masks(energy, backend):
    x = torch.randn(4, 24, 16)
    torch.manual_seed(0)
    model = _Refiner()
    comp = laser_fx.compress(copy.deepcopy(model), sites=["block"],
                             config=LaserConfig(energy=energy, min_numel=0,
                                                compile_backend=backend),
                             example_inputs=(x,))
    explained = torch._dynamo.explain(copy.deepcopy(comp))(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(comp, backend=backend, fullgraph=True)
    outs = []
    for step in range(3):  # the plain re-run first, then the fused vjp graph
        for m, run in ((comp, compiled), (model, lambda x: _same_masks(model, x))):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(step)
            out = run(x)
            _loss(out).backward()
            outs.append(out.detach())
        g_c, g_ref = _grads(comp), _grads(model)
        torch.testing.assert_close(outs[-2], outs[-1], rtol=1e-5, atol=1e-5)  # exact forward
        if energy == 1.0:
            # inductor's fused kernels sum in other orders than eager: its own rounding
            # (up to 1.4e-6 absolute, 1.2e-4 relative on small entries here), far below a
            # mask that is not replayed (O(1) differences)
            tol = (dict(rtol=1e-4, atol=1e-5) if backend == "inductor"
                   else dict(rtol=1e-5, atol=1e-6))
            torch.testing.assert_close(g_c, g_ref, **tol)
        else:
            assert float(F.cosine_similarity(g_c, g_ref, dim=0)) > 0.99
    wrapper = next(m for m in comp.modules() if isinstance(m, SiteWrapper))
    assert wrapper.__dict__.get("_joint") not in (None, False), "the fused graph never ran"
    assert not torch.equal(outs[0], outs[2]), "dropout drew the same masks on another seed"
    model.eval()
    assert not torch.equal(model(x), outs[-1]), "dropout was not active"


@settings(deadline=None, max_examples=30)
@given(st.integers(0, 2**62 - 1), st.integers(0, 50), st.floats(0.05, 0.9),
       st.integers(1, 3000))
def test_a_dropout_mask_is_a_function_of_its_seed_and_index(s, index, p, numel):
    like = torch.empty(numel)
    mask = dropout_mask(torch.tensor(s), index, like, p)
    torch.testing.assert_close(mask, dropout_mask(torch.tensor(s), index, like, p),
                               rtol=0, atol=0)
    scale = 1.0 / (1.0 - p)
    kept = mask != 0
    torch.testing.assert_close(mask[kept], torch.full_like(mask[kept], scale))
    # kept ~ Binomial(numel, 1 - p): within 6 standard deviations
    sd = math.sqrt(numel * p * (1 - p))
    assert abs(int(kept.sum()) - numel * (1 - p)) <= 6 * sd + 1
    if numel >= 200:  # another index: another mask (equal with probability < 0.8^200)
        assert not torch.equal(mask, dropout_mask(torch.tensor(s), index + 1, like, p))


class _AttnBlock(nn.Module):
    """Attention with the fused kernel's own dropout, as Hugging Face layers call it."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.heads = heads

    def forward(self, h: torch.Tensor, inject: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h + inject).chunk(3, -1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.25 if self.training else 0.0)
        return h + a.transpose(1, 2).flatten(-2)


def test_attention_dropout_is_seeded_and_replayed():
    x = torch.randn(2, 12, 16)
    torch.manual_seed(0)
    model = _Refiner()
    model.block = _AttnBlock()
    comp = laser_fx.compress(copy.deepcopy(model), sites=["block"],
                             config=LaserConfig(energy=1.0, min_numel=0,
                                                compile_backend=BACKEND),
                             example_inputs=(x,))
    compiled = torch.compile(comp, backend=BACKEND, fullgraph=True)
    for step in range(2):
        grads = []
        for m, run in ((comp, compiled), (model, lambda x: _same_masks(model, x))):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(step)
            _loss(run(x)).backward()  # the fused kernel's dropout would raise here
            grads.append(_grads(m))
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@settings(deadline=None, max_examples=30)
@given(st.integers(0, 2**31 - 1), st.integers(1, 9), st.integers(1, 9),
       st.sampled_from(["none", "bool", "float"]), st.booleans(), st.booleans())
def test_written_out_attention_is_the_fused_one(s, n_q, n_k, mask, causal, gqa):
    g = torch.Generator().manual_seed(s)
    q = torch.randn(2, 4, n_q, 8, generator=g)
    k, v = (torch.randn(2, 2 if gqa else 4, n_k, 8, generator=g) for _ in range(2))
    attn_mask = {"none": None, "float": torch.randn(n_q, n_k, generator=g),
                 "bool": torch.rand(n_q, n_k, generator=g) > 0.3}[mask]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask[:, 0] = True  # no row masked out entirely (both give NaN there)
    causal = causal and attn_mask is None  # the fused kernel refuses both
    want = F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=causal,
                                          enable_gqa=gqa)
    got = attention(q, k, v, attn_mask, causal, None, gqa, lambda w: w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
