"""Tests of `compressed_region`: selection rules, dedupe, bytes, gradients, the collapse guard."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from laser_fx.config import LaserConfig
from laser_fx.errors import LaserFxError
from laser_fx.ops.checkpoint import compressed_checkpoint
from laser_fx.ops.region import CompressedRegion, compressed_region
from laser_fx.tracker import SubspaceTracker

B, L, H = 4, 16, 4


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


class SwiGLU(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.gu = nn.Linear(d, 2 * f, bias=False)
        self.dn = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gu(x).chunk(2, -1)
        return self.dn(F.silu(g) * u)


class Attn(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, d // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.o(a.transpose(1, 2).reshape(b, n, d))


class PostNorm(nn.Module):
    """``rms(x + mix(x))``: one sub-block of a TRM block."""

    def __init__(self, mix: nn.Module) -> None:
        super().__init__()
        self.mix = mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x + self.mix(x))


class TRMNet(nn.Module):
    """TRM's shared net: input injection, then 2 post-norm blocks of attention + SwiGLU."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [PostNorm(Attn(d)) if i % 2 == 0 else PostNorm(SwiGLU(d, f)) for i in range(4)]
        )

    def forward(self, z: torch.Tensor, inj: torch.Tensor) -> torch.Tensor:
        z = z + inj
        for layer in self.layers:
            z = layer(z)
        return z


def _low_rank(d: int, r: int, noise: float = 0.0) -> torch.Tensor:
    x = torch.randn(B * L, r) @ torch.randn(r, d) / math.sqrt(r)
    return (x + noise * torch.randn(B * L, d)).reshape(B, L, d)


def _trackers(cfg: LaserConfig, *widths: int) -> dict[int, SubspaceTracker]:
    return {w: SubspaceTracker(w, cfg) for w in widths}


def _cos(a, b) -> float:
    fa = torch.cat([t.reshape(-1) for t in a])
    fb = torch.cat([t.reshape(-1) for t in b])
    return float(F.cosine_similarity(fa, fb, dim=0))


def _run_block(block, x0, trackers=None, cfg=None, **kw):
    """Output, gradients (input, params) and region stats of one block call."""
    x = x0.clone().requires_grad_()
    h = x * 1.0  # a non-leaf, like every activation inside a model
    if trackers is None:
        out, stats = block(h), None
    else:
        with compressed_region(trackers, cfg, **kw) as region:
            out = block(h)
        stats = region.stats
    loss = (out * torch.linspace(-1, 1, out.shape[-1])).pow(2).sum()
    return out, torch.autograd.grad(loss, [x, *block.parameters()]), stats


BLOCKS = {"swiglu": lambda d: PostNorm(SwiGLU(d, 2 * d)), "attention": lambda d: PostNorm(Attn(d))}


@settings(max_examples=8)
@given(kind=st.sampled_from(sorted(BLOCKS)), r=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_forward_is_bitwise_uncompressed(kind, r, seed):
    torch.manual_seed(seed)
    block = BLOCKS[kind](32)
    x0 = _low_rank(32, r, noise=0.1)
    cfg = LaserConfig(rank=2, min_numel=64)
    out0, _, _ = _run_block(block, x0)
    out1, _, stats = _run_block(block, x0, _trackers(cfg, 32, 64), cfg)
    assert torch.equal(out0, out1)
    assert stats.packed >= 1


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_energy_one_gives_uncompressed_gradients(kind):
    torch.manual_seed(0)
    block = BLOCKS[kind](32)
    x0 = torch.randn(B, L, 32)
    cfg = LaserConfig(energy=1.0, fidelity=1.0, min_numel=64)
    _, g0, _ = _run_block(block, x0)
    _, g1, stats = _run_block(block, x0, _trackers(cfg, 32, 64), cfg)
    assert stats.packed >= 1
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _LowRankBlock(nn.Module):
    """Every width-wide tensor it saves is a row-scaling or linear map of x: rank <= rank(x)."""

    def __init__(self, d: int, e: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, e, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(self.lin(_rms(x)) * 2.0)


@settings(max_examples=10)
@given(r=st.integers(1, 6), extra=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_activations_of_rank_at_most_k_give_near_exact_gradients(r, extra, seed):
    torch.manual_seed(seed)
    block = _LowRankBlock(32, 48)
    cfg = LaserConfig(rank=r + extra, min_numel=64)
    x0 = _low_rank(32, r)
    _, g0, _ = _run_block(block, x0)
    _, g1, stats = _run_block(block, x0, _trackers(cfg, 32, 48), cfg)
    assert stats.packed >= 2 and stats.stored_bytes < stats.dense_bytes
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))


@pytest.mark.parametrize(
    "kind,widths,bound",
    [("swiglu", (32, 64), 0.985), ("attention", (32,), 0.99)],
    ids=["swiglu", "attention"],
)
def test_stored_bytes_follow_formula_and_gradients_stay_close(kind, widths, bound):
    torch.manual_seed(1)
    k = 8
    block = BLOCKS[kind](32)
    x0 = _low_rank(32, 4, noise=0.05)
    cfg = LaserConfig(rank=k, min_numel=64)
    trackers = _trackers(cfg, *widths)
    _, g0, _ = _run_block(block, x0)
    _, g1, stats = _run_block(block, x0, trackers, cfg)
    # every packed tensor is (B, L, width): N * k fp32 coefficients, plus one basis per version
    # per record: coefficients (B*L x k) and the row mean (its width), fp32
    mean_bytes = stats.stored_bytes - stats.packed * B * L * k * 4
    assert stats.packed * min(widths) * 4 <= mean_bytes <= stats.packed * max(widths) * 4, (
        stats.to_dict())
    widths_of_bases = [b.shape[0] for b in stats._bases.values()]
    assert stats.basis_bytes == sum(w * k * 4 for w in widths_of_bases)
    ratio = (stats.stored_bytes + stats.basis_bytes) / stats.dense_bytes
    cos = _cos(g1, g0)
    assert cos >= bound, f"{kind}: gradient cosine {cos:.5f} < {bound} (bytes ratio {ratio:.3f})"


def test_selection_rules():
    d, f = 32, 64
    cfg = LaserConfig(rank=4, min_numel=64)
    region = compressed_region(_trackers(cfg, d, f, L), cfg, batch_shape=(B, L))
    loose = compressed_region(_trackers(cfg, d, f, L), cfg, include_2d=True)
    w = nn.Parameter(torch.randn(f, d))
    act = torch.randn(B, L, d) * 1.0
    cases = {
        "activation (B,L,D)": (act, True, True),
        "swiglu intermediate (B,L,F)": (torch.randn(B, L, 2 * f)[..., :f], True, True),
        "parameter": (w, False, False),
        "weight view w.t()": (w.t(), False, False),
        "leaf requiring grad": (torch.randn(B, L, d, requires_grad=True), False, False),
        "integer": (torch.ones(B, L, d, dtype=torch.long), False, False),
        "small": (torch.randn(1, 1, d), False, False),
        "per-head q (B,H,L,dh)": (torch.randn(B, H, L, d // H), False, False),
        "attention probs (B,H,L,L)": (torch.randn(B, H, L, L), False, False),
        "softmax stats (B,H,L), L a width": (torch.randn(B, H, L), False, True),
        "norm statistic (B,L,1)": (torch.randn(B, L, 1), False, False),
        "flattened linear input (N,D)": (act.view(B * L, d), False, True),
    }
    got = {
        n: (region._tracker_for(t) is not None, loose._tracker_for(t) is not None)
        for n, (t, _, _) in cases.items()
    }
    want = {n: (a, b) for n, (_, a, b) in cases.items()}
    assert got == want


def test_tensor_saved_twice_is_packed_once_and_reconstructed_once():
    cfg = LaserConfig(rank=4, min_numel=64)
    trk = _trackers(cfg, 32)
    x = _low_rank(32, 3).requires_grad_()
    h = x * 1.0
    with compressed_region(trk, cfg) as region:
        out = h.sin() + h * h  # h saved by sin and twice by mul
        h1, h2 = region._pack(h), region._pack(h.view(B, L, 32))  # same storage/layout
    assert region.stats.packed == 1 and region.stats.deduped == 4, region.stats.to_dict()
    assert h1 is h2 and h1.get() is h2.get()
    out.sum().backward()
    hd = h.detach()
    torch.testing.assert_close(x.grad, hd.cos() + 2 * hd, rtol=1e-4, atol=1e-4)


def test_nothing_stays_installed_after_an_exception():
    cfg = LaserConfig(rank=4, min_numel=64)
    trk = _trackers(cfg, 32)
    x = torch.randn(B, L, 32, requires_grad=True) * 1.0
    with pytest.raises(ZeroDivisionError):
        with compressed_region(trk, cfg) as region:
            (x * x).sum()
            raise ZeroDivisionError
    before = region.stats.to_dict()
    calls = trk[32].stats()["calls"]
    y = (x * x).sin()  # would be packed if the hooks were still installed
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert region.stats.to_dict() == before and trk[32].stats()["calls"] == calls == 1
    y.sum().backward()


def test_inactive_without_grad_and_inside_a_checkpoint():
    cfg = LaserConfig(rank=4, min_numel=64)
    trk = _trackers(cfg, 32, 64)
    block = BLOCKS["swiglu"](32)
    x = _low_rank(32, 3) * 1.0
    with torch.no_grad(), compressed_region(trk, cfg) as region:
        block(x)
    assert region.stats.packed == 0

    def fn(z: torch.Tensor) -> torch.Tensor:
        with compressed_region(trk, cfg) as inner:
            regions.append(inner)
            return block(z)

    regions: list = []
    xr = x.clone().requires_grad_()
    compressed_checkpoint(fn, trk, xr * 1.0, params=list(block.parameters())).sum().backward()
    assert len(regions) == 2 and all(r.stats.packed == 0 for r in regions)  # forward + re-run
    assert xr.grad is not None


@pytest.mark.parametrize("what", ["packed-activation", "kept-parameter", "none"])
def test_in_place_modification_of_a_saved_tensor_raises_in_backward(what):
    # Saved-tensor hooks switch off autograd's own version check; the region must do it, or
    # gradients are computed at the new values (issue 14: 6% error in mode region).
    cfg = LaserConfig(rank=4, min_numel=64)
    trk = _trackers(cfg, 32)
    x = _low_rank(32, 3).requires_grad_()
    w = torch.randn(32, requires_grad=True)  # a leaf: kept exactly (`_Kept`)
    h = x * 1.0
    with compressed_region(trk, cfg) as region:
        y = torch.sin(h) * w  # sin saves h, mul saves sin(h): both packed
    assert region.stats.packed == 2
    if what != "none":
        with torch.no_grad():
            (h if what == "packed-activation" else w).add_(1.0)
    if what == "none":  # control: unmodified, backward runs
        y.sum().backward()
        assert x.grad is not None and w.grad is not None
        return
    with pytest.raises(LaserFxError, match=r"modified in place after the forward \(version"):
        y.sum().backward()


def _trm_gradients(net, z0, y0, x0, mode, cfg, steps):
    """Parameter gradients after ``steps`` z-updates ``z = net(z, x + y)`` (TRM's inner loop).

    As mechanism ``region`` runs it: the i-th tensor a call packs has its own tracker, which
    follows that tensor across recursion steps (`CompressedRegion`'s ``slot_tracker``).
    """
    x = x0.clone().requires_grad_()
    z, inj = z0, x * 1.0 + y0
    slots: dict[tuple[int, int], SubspaceTracker] = {}
    stats = []
    for _ in range(steps):
        if mode == "plain":
            z = net(z, inj)
            continue
        with CompressedRegion(
            {},
            cfg,
            widths=(z0.shape[-1], 2 * z0.shape[-1]),
            exclude_rules=mode == "selective",
            tracker_factory=lambda w: SubspaceTracker(w, cfg),
            slot_tracker=lambda i, w, t: slots.setdefault((i, w), SubspaceTracker(w, cfg)),
        ) as region:
            z = net(z, inj)
        stats.append(region.stats)
    loss = (z * torch.linspace(-1, 1, z.shape[-1])).pow(2).sum()
    grads = torch.autograd.grad(loss, list(net.parameters()))
    kept = sum(s.stored_bytes + s.basis_bytes for s in stats)
    return grads, kept / max(1, sum(s.dense_bytes for s in stats))


# Seeds whose indiscriminate run shows the collapse at this small size (measured: 4 of 6 do;
# since a tracker counts a new basis in its store-dense decision, fewer tensors compress).
@pytest.mark.parametrize("seed", [2, 4])
def test_collapse_guard_exclusions_keep_gradients(seed):
    # Regression guard for DESIGN.md's measured collapse: storing every saved tensor at 99%
    # energy (per-head q/k/v, softmax statistics included) broke training; the selective
    # region must stay close to the uncompressed gradient over several recursion steps.
    torch.manual_seed(seed)
    d = 32
    net = TRMNet(d, 2 * d)
    z0, y0, x0 = (_low_rank(d, 4, noise=0.05) for _ in range(3))
    # The uncentered tracker (center=False) reproduces the collapse; centering (the default)
    # keeps the shared per-feature offsets of those tensors exactly and avoids it as well.
    raw = LaserConfig(energy=0.99, fidelity=0.99, min_numel=256, center=False)
    g0, _ = _trm_gradients(net, z0, y0, x0, "plain", raw, 4)
    g_sel, r_sel = _trm_gradients(net, z0, y0, x0, "selective", raw, 4)
    g_all, r_all = _trm_gradients(net, z0, y0, x0, "indiscriminate", raw, 4)
    cos_sel, cos_all = _cos(g_sel, g0), _cos(g_all, g0)
    msg = f"selective {cos_sel:.5f} (bytes {r_sel:.3f}), indiscriminate {cos_all:.5f} (bytes {r_all:.3f})"
    assert cos_sel >= 0.99 and r_sel < 0.8, msg  # it does compress
    assert cos_all < 0.99 and cos_all < cos_sel, msg
    centered = LaserConfig(energy=0.99, fidelity=0.99, min_numel=256)
    for rules in ("selective", "indiscriminate"):
        g, _ = _trm_gradients(net, z0, y0, x0, rules, centered, 4)
        assert _cos(g, g0) >= 0.99, f"centered {rules}: {_cos(g, g0):.5f}; {msg}"
