"""Numerical faults and unusual autograd use, for every mechanism.

A compressed model must (a) compute the uncompressed forward bitwise, (b) give the
uncompressed gradients at ``energy=1.0``, (c) keep its tracker state finite, and (d) recover
after a faulty step. Faults covered: NaN/Inf activations, all-zero and rank-1 activations,
bf16/fp16 models, batch size and sequence length changing between steps, an exception raised
inside the shared block, ``retain_graph=True`` twice, ``create_graph=True``, and gradient
accumulation over several forwards.

`compress` works in place, so each test compresses a deep copy (`_compressed`) and compares it
with the untouched original.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import laser_fx
from laser_fx import LaserConfig, LaserFxError
from laser_fx.testing.zoo import LoopedTransformer, TRMLike, UnrolledRNN

MODES = ("auto", "linear", "region", "checkpoint")
LOSSLESS = dict(energy=1.0, min_numel=0)


def _loss(out: torch.Tensor) -> torch.Tensor:
    # not mean(out²): a LayerNorm output's mean square is ~1 whatever the weights, so that
    # loss has ~0 gradients and any gradient error would hide under atol
    return out.float().cumsum(-1).pow(2).mean()


def _params(m: nn.Module) -> list[torch.Tensor]:
    return [p for p in m.parameters() if p.requires_grad]


def _grads(m: nn.Module, inputs: tuple) -> tuple[torch.Tensor, ...]:
    """Gradients of ``m``'s own parameters (a compressed copy has the original's order)."""
    return torch.autograd.grad(_loss(m(*inputs)), _params(m))


def _compressed(model: nn.Module, inputs: tuple, **cfg) -> nn.Module:
    """A compressed deep copy of ``model`` (compress modifies its argument in place)."""
    return laser_fx.compress(
        copy.deepcopy(model), config=LaserConfig(**cfg), example_inputs=inputs
    )


def _assert_grads_close(got, want, rtol=1e-4, floor=1e-6, what=""):
    """Per parameter ``||g - w|| <= rtol ||w|| + floor ||all of want||``.

    Norm-wise, not element-wise: ``energy=1.0`` drops directions below 1e-10 of the energy
    (rounding noise), which moves near-zero gradient entries by more than an element-wise
    rtol while the gradient as a whole stays within ~1e-5 (measured 5e-5 worst, rank-1 input).
    The floor covers gradients that are rounding noise themselves (attention q/k when every
    token is the same), which have no relative accuracy.
    """
    total = float(torch.cat([w.float().flatten() for w in want]).norm())
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        err, ref = float((g.float() - w.float()).norm()), float(w.float().norm())
        assert g.shape == w.shape and err <= rtol * ref + floor * total, (
            f"{what} param {i}: |g - w| = {err:.3e} > {rtol} * |w| ({ref:.3e}) "
            f"+ {floor} * {total:.3e}"
        )


def _trackers(cmodel: nn.Module) -> list[laser_fx.SubspaceTracker]:
    trackers = [
        t for m in cmodel.modules() if isinstance(m, laser_fx.SiteWrapper)
        for t in m.trackers.values()
    ]
    assert trackers, "no tracker was created: nothing was compressed"
    return trackers


def _tracker_state(cmodel: nn.Module) -> list[torch.Tensor]:
    return [v for t in _trackers(cmodel) for v in t.state_dict().values()]


def _tracker_state_finite(cmodel: nn.Module) -> bool:
    return all(torch.isfinite(v).all() for v in _tracker_state(cmodel) if v.is_floating_point())


def _seeded(cls, seed=0, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**kw)


def _looped():
    return _seeded(LoopedTransformer, d=32, loops=3), (
        torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0)),
    )


def _rnn():
    return _seeded(UnrolledRNN, d_in=8, d_hidden=32, steps=4), (
        torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0)),
    )


def _trm(**kw):
    m = _seeded(TRMLike, d=32, seq=8, n=2, T=2, **kw)
    return m, (torch.randint(0, m.vocab, (2, 8), generator=torch.Generator().manual_seed(0)),)


FLOAT_MODELS = {"looped": _looped, "rnn": _rnn}


# ------------------------------------------------------------------ NaN / Inf


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", ["nan", "inf"])
@pytest.mark.parametrize("name", list(FLOAT_MODELS))
def test_nonfinite_step_is_stored_dense_and_training_recovers(name, fault, mode):
    model, (x,) = FLOAT_MODELS[name]()
    # rank >= every width: lossless, and a fixed-rank tracker never backs off (in energy
    # mode these few-row activations are incompressible, and a tracker backing off stores
    # dense without looking at them, so it would not count the non-finite call)
    cmodel = _compressed(model, (x,), mode=mode, rank=4096, fidelity=1.0, min_numel=0)
    _grads(cmodel, (x,))  # warm bases
    bad = x.clone()
    bad[0, 0, 0] = float(fault)
    before = {id(t): int(t.dense_stores) for t in _trackers(cmodel)}
    out = cmodel(bad)  # (UnrolledRNN's tanh turns +-inf into +-1: its output can stay finite)
    _loss(out).backward()  # a non-finite step: the caller skips the optimizer step
    cmodel.zero_grad(set_to_none=True)
    rep = laser_fx.report(cmodel).to_dict()
    assert rep["totals"]["nonfinite"] > 0, "the non-finite step was not counted"
    assert _tracker_state_finite(cmodel), "non-finite values reached the tracker state"
    for t in _trackers(cmodel):
        if int(t.nonfinite):  # every non-finite activation was kept as it is, not projected
            assert int(t.dense_stores) > before.get(id(t), 0)
    if name == "looped":  # attention spreads the fault to every activation of the step
        for t in _trackers(cmodel):
            assert int(t.stored_bytes) == int(t.dense_bytes), (
                "a non-finite activation was projected"
            )
    # the next clean steps are exact again
    for _ in range(2):
        torch.testing.assert_close(cmodel(x), model(x), rtol=0, atol=0)
        _assert_grads_close(_grads(cmodel, (x,)), _grads(model, (x,)), what="after fault")
    assert _tracker_state_finite(cmodel)


def test_training_with_skipped_nonfinite_steps_stays_finite():
    model, (x,) = _looped()
    cmodel = laser_fx.compress(model, example_inputs=(x,))  # default config: lossy
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    skipped = 0
    for step in range(6):
        # >= min_numel and low-rank: the trackers hold a basis and examine every call
        xs = torch.randn(4, 16, 3, generator=g) @ torch.randn(3, 32, generator=g)
        if step in (1, 3):
            xs[1, 2, 3] = float("nan") if step == 1 else float("-inf")
        loss = _loss(cmodel(xs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss):  # as a grad scaler would: skip the step
            skipped += 1
            continue
        assert all(torch.isfinite(p.grad).all() for p in _params(model))
        opt.step()
    assert skipped == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _tracker_state_finite(cmodel)
    assert laser_fx.report(cmodel).to_dict()["totals"]["nonfinite"] > 0


# ------------------------------------------------------------------ degenerate activations


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["zeros", "rank1"])
@pytest.mark.parametrize("name", list(FLOAT_MODELS))
def test_zero_and_rank1_activations(name, kind, mode):
    model, (x,) = FLOAT_MODELS[name]()
    if kind == "zeros":
        z = torch.zeros_like(x)
    else:  # every token the same direction: rank-1 input
        u = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(3))
        z = torch.randn(*x.shape[:-1], 1, generator=torch.Generator().manual_seed(4)) * u
    for energy in (1.0, 0.99):
        cmodel = _compressed(model, (x,), mode=mode, energy=energy, min_numel=0)
        for inp in (z, x, z):  # degenerate first (cold tracker), then after a normal step
            torch.testing.assert_close(cmodel(inp), model(inp), rtol=0, atol=0)
            got, want = _grads(cmodel, (inp,)), _grads(model, (inp,))
            assert all(torch.isfinite(g).all() for g in got)
            if energy == 1.0:
                # rank-1 input: every token the same direction, so some weight gradients
                # (attention's output projection) are near-cancellations, |dYᵀX| << |dY||X|,
                # and the 1e-10-energy rounding floor moves them by ~1e-4 of their norm
                # (this test's attn.o.weight, centered or not); a wrong gradient is O(1) off
                _assert_grads_close(got, want, rtol=5e-4 if kind == "rank1" else 1e-4,
                                    what=f"{kind}")
        assert _tracker_state_finite(cmodel)


# ------------------------------------------------------------------ low precision


def _half_ok(dtype: torch.dtype) -> bool:
    try:
        a = torch.ones(4, 4, dtype=dtype, requires_grad=True)
        (a @ a).sum().backward()
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_model(dtype, mode):
    if not _half_ok(dtype):
        pytest.skip(f"{dtype} matmul backward not supported on this CPU")
    model, inputs = _trm()
    model.to(dtype)
    cmodel = _compressed(model, inputs, mode=mode, **LOSSLESS)
    exact = _compressed(model, inputs, mode=mode, store_dtype=torch.float32, **LOSSLESS)
    for _ in range(2):
        out = cmodel(*inputs)
        assert out.dtype == dtype
        torch.testing.assert_close(out, model(*inputs), rtol=0, atol=0)
        want = _grads(model, inputs)
        got = _grads(cmodel, inputs)
        assert all(g.dtype == dtype and torch.isfinite(g).all() for g in got)
        flat = lambda gs: torch.cat([g.float().flatten() for g in gs])  # noqa: E731
        rel = float((flat(got) - flat(want)).norm() / flat(want).norm())
        # energy=1.0 stores coefficients in the activation dtype: one more rounding of the
        # block inputs (checkpoint mode recomputes the whole block from them), measured
        # 1.7% (bf16) / 0.08% (fp16) relative to the dense low-precision gradient
        assert rel < (0.04 if dtype == torch.bfloat16 else 0.005), f"rel err {rel:.4f}"
        # fp32 coefficients: the reconstruction rounds back to the exact activations
        rel32 = float((flat(_grads(exact, inputs)) - flat(want)).norm() / flat(want).norm())
        assert rel32 < (1e-2 if dtype == torch.bfloat16 else 1e-3), (
            f"store_dtype=fp32 rel err {rel32:.5f}"
        )
    assert _tracker_state_finite(cmodel)
    # bases and fidelities stay fp32 whatever the model's dtype
    assert {v.dtype for v in _tracker_state(cmodel) if v.is_floating_point()} <= {torch.float32}


# ------------------------------------------------------------------ shapes changing between steps

SHAPES = [(3, 8), (1, 8), (5, 5), (2, 11), (1, 1)]


@pytest.mark.parametrize("mode", MODES)
def test_batch_and_sequence_length_change_between_steps(mode):
    trm, (tok,) = _trm()
    looped, (x,) = _looped()
    ctrm = _compressed(trm, (tok,), mode=mode, **LOSSLESS)
    clooped = _compressed(looped, (x,), mode=mode, **LOSSLESS)
    g = torch.Generator().manual_seed(2)
    for b, length in SHAPES:
        tokens = torch.randint(0, trm.vocab, (b, length), generator=g)
        feats = torch.randn(b, length, 32, generator=g)
        for model, cmodel, inp in ((trm, ctrm, tokens), (looped, clooped, feats)):
            torch.testing.assert_close(cmodel(inp), model(inp), rtol=0, atol=0)
            _assert_grads_close(
                _grads(cmodel, (inp,)),
                _grads(model, (inp,)),
                what=f"{type(model).__name__} B={b} L={length}",
            )
    assert _tracker_state_finite(ctrm) and _tracker_state_finite(clooped)


# ------------------------------------------------------------------ exception inside the block


class _TableBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.table = nn.Embedding(10, d)

    def forward(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return h + self.lin2(torch.tanh(self.lin1(h))) + self.table(idx)


class _RaisesInThirdCall(nn.Module):
    """Call i of the shared block looks up ``idx + i``: idx=8 raises inside the 3rd call,
    after two calls have already stored activations through the saved-tensor hooks."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.block = _TableBlock(d)

    def forward(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            h = self.block(h, idx + i)
        return h


def _saved_tensor_hooks_installed() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


@pytest.mark.parametrize("mode", MODES)
def test_exception_inside_block_leaves_no_hooks_and_next_step_is_exact(mode):
    model = _seeded(_RaisesInThirdCall)
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    good, bad = torch.zeros(2, 5, dtype=torch.long), torch.full((2, 5), 8)
    cmodel = _compressed(model, (h, good), mode=mode, **LOSSLESS)
    for _ in range(2):
        with pytest.raises(IndexError):
            cmodel(h, bad)
        assert not _saved_tensor_hooks_installed(), "a failed forward left saved-tensor hooks"
        # a plain op saves its real tensor (no laser_fx pack hook intercepts it)
        a = torch.randn(3, requires_grad=True)
        assert torch.equal(a.exp().grad_fn._saved_result, a.exp())
        torch.testing.assert_close(cmodel(h, good), model(h, good), rtol=0, atol=0)
        _assert_grads_close(
            _grads(cmodel, (h, good)), _grads(model, (h, good)), what="after exception"
        )
    assert _tracker_state_finite(cmodel)


# ------------------------------------------------------------------ retain_graph / create_graph

# Regression: compressed_linear keeps its coefficients as saved tensors, so a retained graph
# can be backpropagated twice.
@pytest.mark.parametrize("mode", ["auto", "linear", "region", "checkpoint"])
def test_backward_twice_with_retain_graph(mode):
    model, inputs = _trm()
    cmodel = laser_fx.compress(
        model, config=LaserConfig(mode=mode, min_numel=0), example_inputs=inputs
    )
    params = _params(cmodel)
    loss = _loss(cmodel(*inputs))
    first = torch.autograd.grad(loss, params, retain_graph=True)
    second = torch.autograd.grad(loss, params, retain_graph=True)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    third = torch.autograd.grad(loss, params)  # the last one frees the graph
    for a, b in zip(first, third, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, params)


def _hvp_like(model, inputs):
    """Gradient of ||grad||² w.r.t. the parameters (a double backward)."""
    params = _params(model)
    grads = torch.autograd.grad(_loss(model(*inputs)), params, create_graph=True)
    total = sum((g.float() ** 2).sum() for g in grads if g.requires_grad)
    out = torch.autograd.grad(total, params, allow_unused=True)
    return [torch.zeros_like(p) if o is None else o for o, p in zip(out, params, strict=True)]


# Regression: compressed checkpoints used to return second derivatives SILENTLY WRONG under
# create_graph=True; they now raise a LaserFxError.
@pytest.mark.parametrize("mode", ["auto", "linear", "region", "checkpoint"])
def test_create_graph_is_exact_or_a_clear_error(mode):
    # UnrolledRNN: tanh cell, no attention (CPU SDPA has no double backward of its own)
    model, inputs = _rnn()
    want = _hvp_like(model, inputs)
    cmodel = _compressed(model, inputs, mode=mode, **LOSSLESS)
    try:
        got = _hvp_like(cmodel, inputs)
    except LaserFxError as e:  # refusing is fine, if it says why and what to do
        assert "create_graph" in str(e) and "exclude" in str(e).lower()
        return
    _assert_grads_close(got, want, what=f"double backward ({mode})")


# ------------------------------------------------------------------ gradient accumulation


@pytest.mark.parametrize("mode", MODES)
def test_gradient_accumulation_over_several_forwards(mode):
    model, _ = _trm()
    cmodel = _compressed(model, (torch.zeros(2, 8, dtype=torch.long),), mode=mode, **LOSSLESS)
    g = torch.Generator().manual_seed(7)
    micro = [torch.randint(0, model.vocab, (b, 8), generator=g) for b in (2, 3, 1)]
    # several forwards alive at once (the trackers move on between them), one backward
    got = torch.autograd.grad(sum(_loss(cmodel(x)) for x in micro), _params(cmodel))
    want = torch.autograd.grad(sum(_loss(model(x)) for x in micro), _params(model))
    _assert_grads_close(got, want, what="one backward")
    # the usual loop: backward per micro-batch into .grad
    for x in micro:
        _loss(cmodel(x)).backward()
    acc = [p.grad.clone() for p in _params(cmodel)]
    _assert_grads_close(acc, want, what="per-micro-batch backward")
