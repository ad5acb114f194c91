"""Stateful fuzzing of a compressed looped transformer (Hypothesis `RuleBasedStateMachine`).

Every mechanism (lossless) and the default config run side by side; a run interleaves
forwards (random batch size and sequence length, sometimes NaN / Inf / all-zero inputs),
backwards of every forward still alive, optimizer steps, and ``state_dict`` round trips
through ``torch.load(weights_only=True)`` into a freshly compressed model (cold trackers: their
state is not in the state dict). Invariants after every rule:

* the forward equals the uncompressed model's bitwise (NaN where it has NaN);
* at ``energy=1.0`` the gradients equal the uncompressed ones (norm-wise, 1e-4);
* the tracker state is finite;
* every tracker stored at most the dense bytes it was given.
"""

from __future__ import annotations

import copy
import io

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

import laser_fx
from laser_fx import LaserConfig, SiteWrapper, SubspaceTracker
from laser_fx.testing.zoo import LoopedTransformer

_D = 32  # > the most tokens a forward has (3 x 6): energy=1.0 still stores low-rank


def _loss(out: torch.Tensor) -> torch.Tensor:
    # not mean(out²): a LayerNorm output's mean square is ~1 whatever the weights, so that
    # loss has ~0 gradients and any gradient error would hide under atol
    return out.float().cumsum(-1).pow(2).mean()


def _build(seed: int = 0) -> LoopedTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LoopedTransformer(d=_D, heads=2, loops=2)


def _arm(model: nn.Module, config: LaserConfig, example: torch.Tensor) -> nn.Module:
    """A compressed copy of ``model`` that shares its parameters (compress works in place)."""
    twin = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
    return laser_fx.compress(twin, config=config, example_inputs=(example,))


def _trackers(cmodel: nn.Module) -> list[SubspaceTracker]:
    return [t for m in cmodel.modules() if isinstance(m, SiteWrapper) for t in m.trackers.values()]


#: arms trained side by side: every mechanism lossless (gradients must equal the dense ones)
#: and the default lossy config (gradients must stay finite)
ARMS = {
    **{
        mode: LaserConfig(mode=mode, energy=1.0, min_numel=0)
        for mode in ("auto", "linear", "region", "checkpoint")
    },
    "default": LaserConfig(min_numel=0),
}


class CompressedTraining(RuleBasedStateMachine):
    """Compressed models (one per arm) trained beside their uncompressed twin.

    All share the twin's parameters, so a step moves every arm; each arm's gradient of the same
    forwards is compared with the twin's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.model = _build()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(2, 4, _D, generator=gen)
        self.cmodels = {a: _arm(self.model, c, example) for a, c in ARMS.items()}
        assert all(p is q for c in self.cmodels.values()
                   for p, q in zip(c.parameters(), self.params, strict=True))
        self.pending: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []
        self.grads: list[torch.Tensor] | None = None
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-2)
        self.gen = torch.Generator().manual_seed(1)

    @rule(
        batch=st.integers(1, 3),
        length=st.integers(1, 6),
        fault=st.sampled_from(["none", "none", "none", "nan", "inf", "zeros"]),
    )
    def forward(self, batch: int, length: int, fault: str) -> None:
        x = torch.randn(batch, length, _D, generator=self.gen)
        if fault == "zeros":
            x.zero_()
        elif fault != "none":
            x[0, length // 2, 3] = float(fault)
        want = self.model(x)
        losses = {}
        for arm, cmodel in self.cmodels.items():
            out = cmodel(x)
            torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True, msg=arm)
            losses[arm] = _loss(out)
        self.pending.append((losses, _loss(want)))

    @precondition(lambda self: self.pending)
    @rule()
    def backward(self) -> None:
        want = torch.autograd.grad(sum(d for _, d in self.pending), self.params)
        finite = all(torch.isfinite(w).all() for w in want)
        for arm in ARMS:
            got = torch.autograd.grad(sum(c[arm] for c, _ in self.pending), self.params)
            if finite:
                assert all(torch.isfinite(g).all() for g in got), f"{arm}: non-finite gradient"
            if finite and ARMS[arm].energy == 1.0:
                # floor at 1e-6 of the whole gradient: with one token, attention's q/k
                # gradients are rounding noise (~1e-9) and have no relative accuracy
                floor = 1e-6 * float(torch.cat([w.flatten() for w in want]).norm())
                for i, (g, w) in enumerate(zip(got, want, strict=True)):
                    err = float((g - w).norm())
                    assert err <= 1e-4 * float(w.norm()) + floor, (
                        f"{arm} param {i}: |g - w| {err:.2e}, |w| {float(w.norm()):.2e}"
                    )
        self.pending = []
        self.grads = list(want) if finite else None  # a non-finite step is skipped

    @precondition(lambda self: self.grads is not None and not self.pending)
    @rule()
    def optimizer_step(self) -> None:
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.grads = None

    @precondition(lambda self: not self.pending)
    @rule(arm=st.sampled_from(list(ARMS)))
    def state_dict_round_trip(self, arm: str) -> None:
        buf = io.BytesIO()
        torch.save(self.cmodels[arm].state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        twin = self.model.state_dict()
        assert state.keys() == twin.keys()  # the user's keys, nothing of laser_fx's
        assert all(torch.equal(state[k], twin[k]) for k in twin)
        example = torch.randn(1, 3, _D, generator=self.gen)
        fresh = _arm(_build(seed=1), ARMS[arm], example)  # other weights, its own tensors
        fresh.load_state_dict(state)  # strict
        for p, q in zip(fresh.parameters(), self.params, strict=True):
            assert torch.equal(p, q)
        # then share the twin's tensors again (the arm must keep following its steps)
        self.cmodels[arm] = _arm(self.model, ARMS[arm], example)

    @invariant()
    def tracker_state_is_finite(self) -> None:
        for arm, cmodel in self.cmodels.items():
            for t in _trackers(cmodel):
                for k, v in t.state_dict().items():
                    if v.is_floating_point():
                        assert torch.isfinite(v).all(), f"{arm}: non-finite tracker state {k}"

    @invariant()
    def stored_at_most_dense(self) -> None:
        for arm, cmodel in self.cmodels.items():
            for t in _trackers(cmodel):
                assert int(t.stored_bytes) <= int(t.dense_bytes), (arm, t.stats())
            totals = laser_fx.report(cmodel).to_dict()["totals"]
            assert totals["stored_bytes"] >= 0 and totals["dense_bytes"] >= 0


CompressedTraining.TestCase.settings = settings(settings.default, stateful_step_count=6)
test_compressed_training_state_machine = CompressedTraining.TestCase
