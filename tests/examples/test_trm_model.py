"""Tests for examples/trm/model.py: forward/backward, no-grad cycles, tracing, loss, EMA, ACT."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from examples.trm.data import iterate_batches, make_dataset, vocab_size
from examples.trm.model import TRM, TRMConfig, swiglu_hidden
from examples.trm.training import (
    EMA,
    DeepSupervision,
    evaluate,
    stablemax_cross_entropy,
    trm_loss,
)
from laser_fx.errors import ConfigError

MIXERS = [
    pytest.param({"mixer": "attn"}, id="attn-rope"),
    pytest.param(
        {"mixer": "attn", "pos_encoding": "learned", "puzzle_emb_len": 2}, id="attn-learned-prefix"
    ),
    pytest.param({"mixer": "mlp_t"}, id="mlp_t"),
    pytest.param({"mixer": "mlp_t", "puzzle_emb_len": 3}, id="mlp_t-prefix"),
]


def _model(T: int = 2, n: int = 2, **kw: object) -> TRM:
    torch.manual_seed(0)
    return TRM(TRMConfig(vocab_size=6, seq_len=16, hidden_size=32, num_heads=4, T=T, n=n, **kw))


def _inputs(batch: int = 3) -> torch.Tensor:
    return torch.randint(1, 6, (batch, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kw", MIXERS)
def test_forward_backward_gives_finite_grads(kw: dict) -> None:
    model = _model(**kw)
    tokens = _inputs()
    y, z = model.initial_carry(3)
    logits, q, y2, z2 = model(tokens, y, z)
    total = model.config.total_len
    assert logits.shape == (3, 16, 6) and q.shape == (3,)
    assert y2.shape == z2.shape == (3, total, 32)
    assert not y2.requires_grad and not z2.requires_grad, "the carry must be detached"
    torch.testing.assert_close(q, torch.full((3,), -5.0))  # halting head starts at bias -5
    loss, _ = trm_loss(logits, torch.randint(2, 6, (3, 16)), q)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


@pytest.fixture(autouse=True)
def _one_thread():
    # these shapes are tiny: a second OpenMP thread only spin-waits on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _saved_bytes(
    model: torch.nn.Module, tokens: torch.Tensor, carry_from: TRM | None = None
) -> int:
    """Bytes of distinct non-parameter storages autograd saves during one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    y, z = (carry_from or model).initial_carry(tokens.shape[0])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, y, z)
    return sum(seen.values())


def test_no_grad_cycles_save_nothing_for_backward() -> None:
    tokens = _inputs(4)
    one, three = _saved_bytes(_model(T=1), tokens), _saved_bytes(_model(T=3), tokens)
    assert one > 0
    assert abs(three - one) <= 0.05 * one, f"T=3 saved {three} B, T=1 saved {one} B"


@pytest.mark.parametrize(
    ("T", "grad_cycles", "carry_gets_grad"),
    [
        pytest.param(1, 1, True, id="T1"),
        pytest.param(2, 1, False, id="T2"),
        pytest.param(3, 2, False, id="T3-grad2"),
        pytest.param(3, 3, True, id="T3-grad3-full-backprop"),
    ],
)
def test_gradient_flows_only_through_the_last_grad_cycles(
    T: int, grad_cycles: int, carry_gets_grad: bool
) -> None:
    model = _model(T=T, grad_cycles=grad_cycles)
    y, z = model.initial_carry(2)
    y.requires_grad_(True)
    logits, *_ = model(_inputs(2), y, z)
    logits.sum().backward()
    # the incoming carry gets a gradient only when no cycle before it runs without grad
    assert (y.grad is not None and y.grad.abs().sum() > 0) == carry_gets_grad


def test_grad_cycles_save_once_per_grad_cycle() -> None:
    tokens = _inputs(4)
    one = _saved_bytes(_model(T=3, grad_cycles=1), tokens)
    for k in (2, 3):
        got = _saved_bytes(_model(T=3, grad_cycles=k), tokens)
        # every grad-enabled cycle keeps its own activations: k times one cycle's, give or take
        # the embedding and the heads, saved once
        assert 0.9 * k * one <= got <= 1.05 * k * one, f"grad_cycles={k}: {got} B, one: {one} B"


def test_deep_supervision_carry_changes_the_output() -> None:
    model = _model()
    tokens = _inputs()
    y, z = model.initial_carry(3)
    first, _, y, z = model(tokens, y, z)
    second, *_ = model(tokens, y, z)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("kw", MIXERS)
def test_fx_symbolic_trace_matches_eager(kw: dict) -> None:
    model = _model(**kw)
    y, z = model.initial_carry(3)
    tokens = _inputs()
    gm = torch.fx.symbolic_trace(model)
    for got, want in zip(gm(tokens, y, z), model(tokens, y, z), strict=True):
        torch.testing.assert_close(got, want)
    calls = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is F.scaled_dot_product_attention
    ]
    if kw["mixer"] == "attn":  # (T cycles * (n + 1) net calls) * 2 blocks
        assert len(calls) == 2 * 3 * 2


def test_laser_fx_trace_keeps_no_grad() -> None:  # laser_fx.trace stays a public utility
    from laser_fx.tracing import trace

    model = _model(T=2)
    tokens = _inputs(4)
    y, z = model.initial_carry(4)
    gm = trace(model, (tokens, y, z))
    for got, want in zip(gm(tokens, y, z), model(tokens, y, z), strict=True):
        torch.testing.assert_close(got, want)
    # plain fx would keep the no-grad cycle for backward too (about 2x the bytes)
    assert _saved_bytes(gm, tokens, model) <= 1.05 * _saved_bytes(_model(T=1), tokens)


@pytest.mark.parametrize(
    ("width", "expansion", "expected"),
    [
        pytest.param(64, 4, 192, id="D64"),
        pytest.param(32, 4, 128, id="D32"),
        pytest.param(512, 4, 1536, id="D512-as-TRM"),
        pytest.param(256, 4, 768, id="D256"),
    ],
)
def test_swiglu_hidden(width: int, expansion: float, expected: int) -> None:
    assert swiglu_hidden(width, expansion) == expected


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        pytest.param({"mixer": "conv"}, "mixer", id="mixer"),
        pytest.param({"mixer": "mlp_t", "pos_encoding": "rope"}, "rope", id="rope-needs-attn"),
        pytest.param({"num_heads": 5}, "num_heads", id="heads"),
        pytest.param({"T": 0}, "`T`", id="T"),
        pytest.param({"grad_cycles": 0}, "grad_cycles", id="grad-cycles-0"),
        pytest.param({"T": 2, "grad_cycles": 3}, r"grad_cycles.*\[1, T=2\]", id="grad-cycles>T"),
        pytest.param({"pos_encoding": "sinus"}, "pos_encoding", id="pos"),
    ],
)
def test_config_validation(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TRMConfig(vocab_size=6, seq_len=16, hidden_size=32, **kw)


@given(st.lists(st.floats(-30, 30), min_size=2, max_size=6), st.data())
def test_stablemax_matches_definition(values: list[float], data: st.DataObject) -> None:
    label = data.draw(st.integers(0, len(values) - 1))
    x = torch.tensor([values], dtype=torch.float64, requires_grad=True)
    loss = stablemax_cross_entropy(x, torch.tensor([label]))
    s = [v + 1 if v >= 0 else 1 / (1 - v) for v in values]
    assert math.isclose(loss.item(), -math.log(s[label] / sum(s)), rel_tol=1e-9, abs_tol=1e-12)
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_stablemax_grad_is_finite_at_one() -> None:
    # 1 / (1 - x) is infinite at x = 1 in the unused branch; its grad must not leak as NaN
    x = torch.tensor([[1.0, -2.0, 0.0]], requires_grad=True)
    stablemax_cross_entropy(x, torch.tensor([1])).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("loss_type", ["softmax", "stablemax"])
def test_trm_loss_matches_formula(loss_type: str) -> None:
    torch.manual_seed(0)
    logits, q = torch.randn(4, 5, 7), torch.randn(4)
    labels = torch.randint(0, 7, (4, 5))
    labels[0, :2] = -100  # unsupervised cells
    loss, metrics = trm_loss(logits, labels, q, loss_type=loss_type)
    mask = labels != -100
    if loss_type == "softmax":
        tok = -torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    else:
        tok = stablemax_cross_entropy(logits, labels.clamp_min(0)).float()
    lm = ((tok * mask).sum(-1) / mask.sum(-1)).sum()
    exact = ((logits.argmax(-1) == labels) | ~mask).all(-1).float()
    want = (lm + 0.5 * F.binary_cross_entropy_with_logits(q, exact, reduction="sum")) / 4
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert metrics["exact_acc"] == exact.mean().item()


def test_trm_loss_perfect_prediction() -> None:
    labels = torch.randint(0, 5, (3, 4))
    logits = F.one_hot(labels, 5).float() * 50
    _, metrics = trm_loss(logits, labels, torch.full((3,), 10.0))
    assert metrics["token_acc"] == metrics["exact_acc"] == metrics["q_halt_acc"] == 1.0
    assert metrics["lm_loss"] < 1e-6
    with pytest.raises(ConfigError, match="loss_type"):
        trm_loss(logits, labels, torch.zeros(3), loss_type="hinge")


def test_ema_update_apply_and_restore() -> None:
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], start + 0.1)
    with ema.apply_to(model):
        torch.testing.assert_close(model.weight.detach(), start + 0.1)
    torch.testing.assert_close(model.weight.detach(), start + 1.0)
    with pytest.raises(ConfigError, match="lacks"):
        ema.update(torch.nn.Linear(3, 2, bias=False))  # no `bias`: not the tracked model


def _fake_stream(batch: int = 4):
    k = 0
    while True:  # batch k holds the value k everywhere, so replacements are visible
        yield torch.full((batch, 2), k), torch.full((batch, 2), k)
        k += 1


def _fake_carry(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(batch, 2, 3), torch.zeros(batch, 2, 3)


def test_deep_supervision_halts_at_max_steps_in_eval() -> None:
    ds = DeepSupervision(_fake_carry, _fake_stream(), max_steps=2, training=False)
    inputs, _, y, _ = ds.next()
    assert (inputs == 0).all()
    halted = ds.update(y + 1, y + 1, torch.full((4,), 9.0))
    assert not halted.any(), "eval mode ignores q_halt"
    inputs, _, y, _ = ds.next()
    assert (inputs == 0).all() and (y == 1).all(), "no halt: same puzzles, carried state"
    assert ds.update(y + 1, y + 1, torch.zeros(4)).all()
    inputs, _, y, _ = ds.next()
    assert (inputs == 2).all() and (y == 0).all(), "halted: new puzzles, fresh carry"
    assert ds.finished == 4


def test_deep_supervision_replaces_only_halted_rows() -> None:
    ds = DeepSupervision(_fake_carry, _fake_stream(), max_steps=16, exploration_prob=0.0)
    _, _, y, _ = ds.next()
    q = torch.tensor([1.0, -1.0, 2.0, -3.0])
    halted = ds.update(y + 5, y + 5, q)
    assert halted.tolist() == [True, False, True, False]
    inputs, labels, y, z = ds.next()
    assert inputs[:, 0].tolist() == [1, 0, 1, 0] and labels[:, 0].tolist() == [1, 0, 1, 0]
    assert y[:, 0, 0].tolist() == [0, 5, 0, 5] and z[:, 0, 0].tolist() == [0, 5, 0, 5]
    assert ds.steps.tolist() == [0, 1, 0, 1]


def test_deep_supervision_exploration_forces_minimum_steps() -> None:
    ds = DeepSupervision(_fake_carry, _fake_stream(), max_steps=16, exploration_prob=1.0)
    _, _, y, _ = ds.next()
    assert not ds.update(y, y, torch.full((4,), 5.0)).any(), "minimum steps are >= 2"
    ds.next()
    with pytest.raises(ConfigError, match="update"):
        ds.next()


def test_tiny_training_reduces_loss() -> None:
    torch.manual_seed(0)
    inputs, labels = make_dataset("sudoku", 4, 256, seed=0)
    model = TRM(TRMConfig(vocab_size=vocab_size("sudoku", 4), seq_len=16, hidden_size=32, n=2, T=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ds = DeepSupervision(
        model.initial_carry, iterate_batches(inputs, labels, 32, seed=0), max_steps=4
    )
    losses = []
    for _ in range(60):
        x, lab, y, z = ds.next()
        logits, q, y, z = model(x, y, z)
        loss, _ = trm_loss(logits, lab, q)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ds.update(y, z, q)
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first, f"loss {first:.3f} -> {last:.3f}"
    acc = evaluate(model, inputs[:64], labels[:64], steps=4)
    assert acc["token_acc"] > 0.5, acc
