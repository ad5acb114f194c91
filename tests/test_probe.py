"""Site discovery by one eager probe run (`laser_fx.probe`, `laser_fx.find_sites`).

The probe runs the user's model as its Python runs (no tracing), so the models here use what
tracing could not: data-dependent halting, dataclass and dict carries, weight casts, grad-mode
switches. It must leave the model as it found it, also when the forward raises.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import laser_fx
from laser_fx import ConfigError, LaserConfig, NoSitesError

D = 8


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*(shape or (2, 4, D)), generator=torch.Generator().manual_seed(seed))


def _by_name(sites):
    return {s.name: s for s in sites}


class Inner(nn.Module):
    """A shared sub-block: one linear applied once per call."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Block(nn.Module):
    """The recursion body: calls its own shared ``inner`` twice per call."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.inner = Inner(d)
        self.up = nn.Linear(d, 3 * d)
        self.down = nn.Linear(3 * d, d)

    def forward(self, x):
        x = self.inner(self.inner(x))
        return x + self.down(F.gelu(self.up(x)))


class OneStepGrad(nn.Module):
    """HRM's pattern: ``nograd`` recursion steps under no_grad, then ``grad`` with grad."""

    def __init__(self, nograd: int = 2, grad: int = 2) -> None:
        super().__init__()
        self.nograd, self.grad = nograd, grad
        self.block = Block()
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        with torch.no_grad():
            for _ in range(self.nograd):
                x = self.block(x)
        for _ in range(self.grad):
            x = self.block(x)
        return self.head(x)


# ------------------------------------------------------------------ uses, order, nesting
@settings(max_examples=10)
@given(nograd=st.integers(0, 3), grad=st.integers(1, 3))
def test_uses_in_execution_order_with_grad_flags(nograd, grad):
    torch.manual_seed(0)
    model = OneStepGrad(nograd, grad)
    x = _x()
    sites = _by_name(laser_fx.find_sites(model, (x,)))
    n = nograd + grad
    flags = [False] * nograd + [True] * grad
    if n < 2:  # called once: not a site, but its inner module still is
        assert "block" not in sites
    else:
        block = sites["block"]
        assert (block.kind, block.block, block.module_type) == ("module", None, "Block")
        assert [u.grad_enabled for u in block.uses] == flags
        assert [u.step for u in block.uses] == list(range(n))
        assert [u.call_index for u in block.uses] == list(range(n))
        assert [u.node for u in block.uses] == [f"block@{i}" for i in range(n)]
        assert all(u.shape == (2, 4, D) for u in block.uses)
        # bytes autograd saved: measured for grad calls (all equal here), None without grad
        saved = [u.nbytes for u in block.uses]
        assert all(b is None for b in saved[:nograd])
        assert len(set(saved[nograd:])) == 1 and saved[-1] > 0
        assert block.activation_bytes == grad * saved[-1]
        assert (block.grad_uses, block.nograd_uses) == (grad, nograd)
        assert block.widths == (D, 3 * D) and block.width == 3 * D
    inner = sites["block.inner"]
    assert [u.grad_enabled for u in inner.uses] == [f for f in flags for _ in range(2)]
    assert inner.block == ("block" if grad >= 2 else None)
    assert "head" not in sites  # called once


def test_nested_sites_name_their_outermost_block():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.ModuleDict({"core": Block()})

        def forward(self, x):
            for _ in range(3):
                x = self.body["core"](x)
            return x

    torch.manual_seed(0)
    sites = laser_fx.find_sites(Outer(), (_x(),))
    got = {s.name: (s.kind, s.block, s.num_uses, s.grad_uses) for s in sites}
    assert got == {
        "body.core": ("module", None, 3, 3),
        "body.core.inner": ("module", "body.core", 6, 6),
        "body.core.inner.lin": ("linear", "body.core", 6, 6),
        "body.core.up": ("linear", "body.core", 3, 3),
        "body.core.down": ("linear", "body.core", 3, 3),
    }
    assert [s.name for s in sites][0] == "body.core"  # in order of first call
    assert _by_name(sites)["body.core.down"].width == 3 * D


def test_site_str_and_counts():
    torch.manual_seed(0)
    block = _by_name(laser_fx.find_sites(OneStepGrad(1, 3), (_x(),)))["block"]
    assert str(block) == f"block (Block, width {3 * D}): 4 uses, 3 with grad"
    assert (block.num_uses, block.grad_uses, block.nograd_uses) == (4, 3, 1)


# ------------------------------------------------------------------ linear widths and casts
class CastedLinear(nn.Module):
    """The TRM / HRM references' linear: the weight is cast to the input's dtype."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class CastedLoop(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.proj = CastedLinear(D, 2 * D)
        self.back = CastedLinear(2 * D, D)

    def forward(self, x):
        h = x.to(self.dtype)
        for _ in range(3):
            h = h + self.back(torch.tanh(self.proj(h)))
        return h.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_casted_linear_called_repeatedly_is_a_site_with_its_width(dtype):
    torch.manual_seed(0)
    model = CastedLoop(dtype)
    x = _x()
    sites = _by_name(laser_fx.find_sites(model, (x,)))
    assert {n: (s.kind, s.width, s.widths, s.grad_uses) for n, s in sites.items()} == {
        "proj": ("module", D, (D,), 3),
        "back": ("module", 2 * D, (2 * D,), 3),
    }
    # mode linear finds the cast weight inside each call and compresses its input
    laser_fx.compress(model, config=LaserConfig(mode="linear", min_numel=0),
                      example_inputs=(x,))
    model(x).pow(2).mean().backward()
    assert model.proj.slots() == ["weight"] and model.back.slots() == ["weight"]
    assert model.proj.weight.grad is not None and model.proj.weight.grad.dtype == torch.float32


class MatmulSides(nn.Module):
    """``h @ W`` in a loop inside one call (a parameter site), ``V @ y`` (parameter on the
    left: the activation's features are not the matmul's contraction) not a site."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(D, D) / D**0.5)
        self.V = nn.Parameter(torch.randn(6, 6) / 6**0.5)

    def forward(self, x, y):
        for _ in range(3):
            x = torch.tanh(x @ self.W.to(x.dtype))
        for _ in range(2):
            y = torch.tanh(self.V @ y)
        return x.sum() + y.sum()


class TiedLM(nn.Module):
    """Embedding and lm_head share one matrix, applied once each: not a recursion."""

    def __init__(self, vocab: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, D)
        self.loop = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        for _ in range(3):
            h = torch.tanh(self.loop(h))
        return self.lm_head(h)


class TwoModulesOneMatrix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class DepthwiseLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(6, 6, 3, padding=1, groups=3)

    def forward(self, x):
        for _ in range(2):
            x = F.gelu(self.conv(x))
        return x


# model, inputs, {site: (kind, width, uses)}
_RULES = [
    pytest.param(TiedLM, lambda: (torch.randint(0, 10, (2, 5)),),
                 {"loop": ("linear", D, 3)}, id="tied-embedding-is-not-a-site"),
    pytest.param(TwoModulesOneMatrix, lambda: (_x(),), {}, id="one-matrix-two-modules-once-each"),
    pytest.param(MatmulSides, lambda: (_x(4, D), _x(6, 3)), {"W": ("matmul", D, 3)},
                 id="x-at-w-only-through-a-cast"),
    pytest.param(DepthwiseLoop, lambda: (_x(2, 6, 7),), {"conv": ("conv", 6, 2)},
                 id="grouped-conv-width-is-in-channels"),
]


@pytest.mark.parametrize(("cls", "inputs", "want"), _RULES)
def test_weight_sharing_rules(cls, inputs, want):
    torch.manual_seed(0)
    sites = laser_fx.find_sites(cls(), inputs())
    assert {s.name: (s.kind, s.width, s.num_uses) for s in sites} == want


def test_conv_block_width_is_its_channels_not_the_image_width():
    # regression: the last dim of a channels-first input (image width 10) was taken as a
    # feature width, and the checkpoint then compressed the block input along it
    class ConvRefiner(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GELU(),
                                       nn.Conv2d(4, 4, 3, padding=1))

        def forward(self, x):
            for _ in range(3):
                x = x + self.block(x)
            return x

    torch.manual_seed(0)
    model = ConvRefiner()
    x = _x(2, 4, 6, 10)
    sites = _by_name(laser_fx.find_sites(model, (x,)))
    assert {n: (s.kind, s.width, s.widths, s.conv_widths) for n, s in sites.items()} == {
        "block": ("module", 4, (4,), (4,)),
        "block.0": ("conv", 4, (4,), (4,)),
        "block.2": ("conv", 4, (4,), (4,)),
    }
    laser_fx.compress(model, config=LaserConfig(min_numel=0), example_inputs=(x,))
    model(x).sum().backward()
    assert {k.partition("@")[0]: t.width for k, t in model.block.trackers.items()} == {"in0": 4}


def test_use_bytes_and_shapes_follow_the_example_inputs():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, x):
            for _ in range(3):
                x = torch.tanh(self.lin(x))
            return x

    torch.manual_seed(0)
    model = Shared()
    for batch in (4, 5):
        (site,) = laser_fx.find_sites(model, (_x(batch, D),))
        assert [u.shape for u in site.uses] == [(batch, D)] * 3
        # a linear call keeps its input for grad_weight (the weight itself is not counted)
        assert [u.nbytes for u in site.uses] == [batch * D * 4] * 3
        assert site.activation_bytes == 3 * batch * D * 4


# ------------------------------------------------------------------ Python the tracer could not
class Halting(nn.Module):
    """An ACT-style loop: stops when the accumulated halting probability, a tensor value,
    reaches ``limit``."""

    def __init__(self, limit: float, max_steps: int = 8) -> None:
        super().__init__()
        self.limit, self.max_steps = limit, max_steps
        self.block = Block()
        self.q = nn.Linear(D, 1)

    def forward(self, x):
        steps, total = 0, x.new_zeros(())
        while steps < self.max_steps and bool(total < self.limit):
            x = self.block(x)
            total = total + torch.sigmoid(self.q(x)).mean()
            steps += 1
        return x, steps


def test_data_dependent_halting_loop():
    torch.manual_seed(0)
    x = _x()
    model = Halting(limit=float("inf"), max_steps=3)
    with torch.no_grad():
        # the 3rd step's probability takes the total past the limit
        model.limit = float(sum(torch.sigmoid(model.q(h)).mean() for h in _states(model, x)))
        model.limit -= 1e-3
    model.max_steps = 8
    assert model(x)[1] == 3  # halts on the value, before max_steps
    (block,) = [s for s in laser_fx.find_sites(model, (x,)) if s.name == "block"]
    assert block.num_uses == block.grad_uses == 3
    ref = copy.deepcopy(model)
    laser_fx.compress(model, config=LaserConfig(energy=1.0, min_numel=0), example_inputs=(x,))
    (out, n), (want, n_ref) = model(x), ref(x)
    assert n == n_ref == 3
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def _states(model, x):
    """The block's outputs of the first ``max_steps`` steps."""
    out = []
    for _ in range(model.max_steps):
        x = model.block(x)
        out.append(x)
    return out


@dataclasses.dataclass
class Carry:
    z: torch.Tensor
    steps: int


class DictModel(nn.Module):
    """Dict batch and dataclass carry in, dataclass carry and dict out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.block = Block()

    def initial_carry(self, batch):
        return Carry(torch.zeros_like(batch["inputs"]), 0)

    def forward(self, carry: Carry, batch: dict):
        z = carry.z
        x = self.embed(batch["inputs"])
        for _ in range(2):
            z = self.block(z + x)
        return Carry(z.detach(), carry.steps + 1), {"logits": z, "halted": z.sum() > 0}


def test_dataclass_and_dict_inputs_and_outputs():
    torch.manual_seed(0)
    model = DictModel()
    batch = {"inputs": _x(), "labels": torch.zeros(2, 4, dtype=torch.long)}
    carry = model.initial_carry(batch)
    sites = _by_name(laser_fx.find_sites(model, (carry,), {"batch": batch}))
    assert sites["block"].grad_uses == 2 and sites["block"].uses[0].shape == (2, 4, D)
    ref = copy.deepcopy(model)
    laser_fx.compress(model, config=LaserConfig(energy=1.0, min_numel=0),
                      example_inputs=(carry,), example_kwargs={"batch": batch})
    c, c_ref = carry, carry
    for _ in range(2):  # two consecutive steps through the carry, as a training loop runs
        (c, out), (c_ref, want) = model(c, batch=batch), ref(c_ref, batch=batch)
        assert isinstance(c, Carry) and c.steps == c_ref.steps
        torch.testing.assert_close(out["logits"], want["logits"], rtol=0, atol=0)
        torch.testing.assert_close(c.z, c_ref.z, rtol=0, atol=0)


# ------------------------------------------------------------------ no side effects
class Stateful(nn.Module):
    """BatchNorm statistics, RNG draws, and a forward that flips a train flag, optionally raising."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.bn = nn.BatchNorm1d(D)
        self.fail = False

    def forward(self, x):
        for _ in range(2):
            x = F.dropout(self.bn(self.lin(x)), 0.5) + torch.rand_like(x)
        self.bn.eval()  # a forward that changes a flag (e.g. a warm-up switch)
        if self.fail:
            raise RuntimeError("boom after the loop")
        return x


@pytest.mark.parametrize("fail", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_probe_leaves_no_trace(fail, grad):
    torch.manual_seed(0)
    model = Stateful()
    model.fail = fail
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    want_rng = torch.rand(3)
    torch.manual_seed(1)
    with torch.set_grad_enabled(grad):
        if fail:
            with pytest.raises(ConfigError, match=r"Stateful.*probe run.*boom after the loop"):
                laser_fx.find_sites(model, (_x(16, D),))
        else:
            assert [s.name for s in laser_fx.find_sites(model, (_x(16, D),))] == ["lin", "bn"]
        assert torch.is_grad_enabled() == grad
    assert torch.equal(torch.rand(3), want_rng), "the caller's RNG stream moved"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"
    assert model.training and model.bn.training, "train flags not restored"
    assert all(p.grad is None for p in model.parameters())
    assert torch._C._len_torch_function_stack() == 0


# ------------------------------------------------------------------ errors
def test_one_grad_call_per_step_is_a_clear_no_sites_error():
    torch.manual_seed(0)
    model = OneStepGrad(nograd=3, grad=1)
    sites = _by_name(laser_fx.find_sites(model, (_x(),)))
    block, inner = sites["block"], sites["block.inner"]
    assert (block.grad_uses, block.nograd_uses) == (1, 3)
    assert inner.grad_uses == 2 and inner.block is None  # twice inside the one grad call
    with pytest.raises(NoSitesError, match=r"block\b.*runs with grad once") as info:
        laser_fx.compress(model, sites=["block"], example_inputs=(_x(),))
    assert "OneStepGrad" in str(info.value)


def test_only_shared_module_with_one_grad_call_names_it():
    class HRMish(nn.Module):
        def __init__(self):
            super().__init__()
            self.level = nn.Linear(D, D)

        def forward(self, x):
            with torch.no_grad():
                for _ in range(4):
                    x = torch.tanh(self.level(x))
            return self.level(x)

    with pytest.raises(NoSitesError, match=r"level.*runs with grad once"):
        laser_fx.compress(HRMish(), example_inputs=(_x(),))


def test_bad_inputs_and_non_modules_are_config_errors():
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match=r"OneStepGrad.*probe run"):
        laser_fx.find_sites(OneStepGrad(), (_x(2, 4, D + 1),))
    with pytest.raises(ConfigError, match="expects an nn.Module"):
        laser_fx.find_sites(lambda x: x)
