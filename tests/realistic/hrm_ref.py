"""A two-level Hierarchical Reasoning Model written the way the public reference writes it.

Features that matter to laser_fx: an ``H_level`` and an ``L_level`` reasoning module
(``z_L = L_level(z_L, z_H + x)``, ``z_H = H_level(z_H, z_L)``); HRM's one-step gradient (every
call but the last L and the last H call under ``torch.no_grad()``); the carry detached at the
end of the inner forward; an ACT wrapper that, in training, calls the inner model a SECOND
time under no_grad for the Q-learning target. ``grad_cycles=k > 0`` is the deep-gradient
variant (the last k H cycles run with grad entirely), in which both levels are recursion
sites; ``grad_cycles=0`` is the reference's schedule, in which each level has one call with
grad per forward (nothing to compress across recursion steps).

Own code, written for these tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class HRMConfig:
    batch_size: int = 4
    seq_len: int = 12
    vocab_size: int = 10
    hidden_size: int = 32
    num_heads: int = 4
    expansion: int = 2
    H_layers: int = 1
    L_layers: int = 1
    H_cycles: int = 3
    L_cycles: int = 2
    grad_cycles: int = 2
    halt_max_steps: int = 3
    halt_exploration_prob: float = 0.1


@dataclass
class HRMInnerCarry:
    z_H: Tensor
    z_L: Tensor


@dataclass
class HRMCarry:
    inner_carry: HRMInnerCarry
    steps: Tensor
    halted: Tensor
    current_data: dict[str, Tensor]


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        b, n, d = x.shape
        x = x + pos  # learned positions, added to the queries' and keys' input
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        y = att.softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class HRMBlock(nn.Module):
    def __init__(self, cfg: HRMConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.attn = SelfAttention(d, cfg.num_heads)
        self.norm1 = nn.RMSNorm(d, eps=1e-5)
        self.norm2 = nn.RMSNorm(d, eps=1e-5)
        self.up = nn.Linear(d, 2 * cfg.expansion * d, bias=False)
        self.down = nn.Linear(cfg.expansion * d, d, bias=False)

    def forward(self, hidden_states: Tensor, pos: Tensor) -> Tensor:
        h = self.norm1(hidden_states + self.attn(hidden_states, pos))
        gate, up = self.up(h).chunk(2, dim=-1)
        return self.norm2(h + self.down(F.silu(gate) * up))


class HRMLevel(nn.Module):
    def __init__(self, cfg: HRMConfig, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(HRMBlock(cfg) for _ in range(layers))

    def forward(self, hidden_states: Tensor, input_injection: Tensor, pos: Tensor) -> Tensor:
        h = hidden_states + input_injection
        for layer in self.layers:
            h = layer(h, pos)
        return h


class HRMInner(nn.Module):
    def __init__(self, cfg: HRMConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(d))  # x1/std at use: unit entries
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, d) * 0.02)
        self.H_level = HRMLevel(cfg, cfg.H_layers)
        self.L_level = HRMLevel(cfg, cfg.L_layers)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.q_head = nn.Linear(d, 2)
        self.H_init = nn.Buffer(torch.randn(d))
        self.L_init = nn.Buffer(torch.randn(d))
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)

    def empty_carry(self, n: int) -> HRMInnerCarry:
        shape = (n, self.config.seq_len, self.config.hidden_size)
        return HRMInnerCarry(torch.zeros(shape), torch.zeros(shape))

    def reset_carry(self, reset: Tensor, carry: HRMInnerCarry) -> HRMInnerCarry:
        flag = reset.view(-1, 1, 1)
        return HRMInnerCarry(torch.where(flag, self.H_init, carry.z_H),
                             torch.where(flag, self.L_init, carry.z_L))

    def _schedule(self):
        """(level, with_grad) for every call, in order."""
        cfg = self.config
        calls = []
        for h in range(cfg.H_cycles):
            deep = h >= cfg.H_cycles - cfg.grad_cycles
            calls += [("L", deep)] * cfg.L_cycles + [("H", deep)]
        if cfg.grad_cycles == 0:  # the reference: one-step gradient through the last L and H
            calls[-2:] = [("L", True), ("H", True)]
        return calls

    def forward(self, carry: HRMInnerCarry, batch: dict[str, Tensor]):
        x = self.embed(batch["inputs"]) * math.sqrt(self.config.hidden_size)
        z_H, z_L = carry.z_H, carry.z_L
        for level, grad in self._schedule():
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                if level == "L":
                    z_L = self.L_level(z_L, z_H + x, self.pos)
                else:
                    z_H = self.H_level(z_H, z_L, self.pos)
        new_carry = HRMInnerCarry(z_H=z_H.detach(), z_L=z_L.detach())
        q = self.q_head(z_H[:, 0]).float()
        return new_carry, self.lm_head(z_H), (q[..., 0], q[..., 1])


class HRM(nn.Module):
    """ACT wrapper; in training the inner model runs a second time (no_grad) for the Q target."""

    def __init__(self, cfg: HRMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.inner = HRMInner(cfg)

    def initial_carry(self, batch: dict[str, Tensor]) -> HRMCarry:
        n = batch["inputs"].shape[0]
        return HRMCarry(self.inner.empty_carry(n), torch.zeros(n, dtype=torch.int32),
                        torch.ones(n, dtype=torch.bool),
                        {k: torch.zeros_like(v) for k, v in batch.items()})

    def forward(self, carry: HRMCarry, batch: dict[str, Tensor]):
        inner = self.inner.reset_carry(carry.halted, carry.inner_carry)
        steps = torch.where(carry.halted, 0, carry.steps)
        data = {k: torch.where(carry.halted.view((-1,) + (1,) * (batch[k].ndim - 1)), batch[k], v)
                for k, v in carry.current_data.items()}
        inner, logits, (q_halt, q_cont) = self.inner(inner, data)
        outputs = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_cont}
        with torch.no_grad():
            steps = steps + 1
            last = steps >= self.config.halt_max_steps
            halted = last
            if self.training:
                halted = halted | (q_halt > q_cont)
                explore = torch.rand_like(q_halt) < self.config.halt_exploration_prob
                halted = halted & (steps >= explore * torch.randint_like(
                    steps, 2, self.config.halt_max_steps + 1))
                next_halt, next_cont = self.inner(inner, data)[-1]
                outputs["target_q_continue"] = torch.sigmoid(
                    torch.where(last, next_halt, torch.maximum(next_halt, next_cont)))
        return HRMCarry(inner, steps, halted, data), outputs


class HRMLossHead(nn.Module):
    def __init__(self, model: HRM) -> None:
        super().__init__()
        self.model = model

    def initial_carry(self, batch: dict[str, Tensor]) -> HRMCarry:
        return self.model.initial_carry(batch)

    def forward(self, carry: HRMCarry, batch: dict[str, Tensor]):
        carry, out = self.model(carry, batch)
        labels = carry.current_data["labels"]
        logits = out["logits"]
        lm = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        with torch.no_grad():
            correct = (logits.argmax(-1) == labels).all(-1).float()
        loss = lm + 0.5 * F.binary_cross_entropy_with_logits(out["q_halt_logits"], correct)
        if "target_q_continue" in out:
            loss = loss + 0.5 * F.binary_cross_entropy_with_logits(out["q_continue_logits"],
                                                                   out["target_q_continue"])
        return carry, loss, {"correct": correct.sum()}


def make_hrm(seed: int = 0, **overrides) -> HRMLossHead:
    torch.manual_seed(seed)
    return HRMLossHead(HRM(HRMConfig(**overrides))).train()


def make_hrm_batch(cfg: HRMConfig, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.batch_size, cfg.seq_len)
    return {"inputs": torch.randint(0, cfg.vocab_size, shape, generator=g),
            "labels": torch.randint(0, cfg.vocab_size, shape, generator=g)}
