"""A Tiny Recursive Model written the way the public reference writes it.

The features that matter to laser_fx, all present: a pydantic config; ``CastedLinear`` (the
weight cast to the input dtype at every call, no bias by default) and a casted embedding;
weight-free RMSNorm; SwiGLU; attention written with einops and RoPE; one reasoning module
``L_level`` used for both updates (``z_L = L_level(z_L, z_H + x)`` n times, then
``z_H = L_level(z_H, z_L)``) with the first T-1 cycles under ``torch.no_grad()``; a dataclass
inner carry and an outer ACT carry (steps, halted, current data) kept across calls; an ACT
wrapper that halts on data and resets halted sequences; a loss head returning
``(carry, loss, metrics, outputs, all_halted)``; ``forward_dtype="bfloat16"``.

Own code, written for these tests from the facts in ``../shared/TRM_FACTS.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import BaseModel
from torch import Tensor, nn

IGNORE = -100


class TRMConfig(BaseModel):
    batch_size: int = 4
    seq_len: int = 16
    vocab_size: int = 12
    num_puzzles: int = 8
    puzzle_emb_len: int = 1
    hidden_size: int = 64
    num_heads: int = 4
    expansion: float = 4.0
    L_layers: int = 2
    H_cycles: int = 2
    L_cycles: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    halt_max_steps: int = 4
    halt_exploration_prob: float = 0.1
    forward_dtype: str = "float32"


@dataclass
class InnerCarry:
    z_H: Tensor
    z_L: Tensor


@dataclass
class ACTCarry:
    inner_carry: InnerCarry
    steps: Tensor
    halted: Tensor
    current_data: dict[str, Tensor]


def _trunc_normal(t: Tensor, std: float) -> Tensor:
    with torch.no_grad():
        return nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std) if std > 0 else t.zero_()


def rms_norm(x: Tensor, eps: float) -> Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32.to(dtype)


class CastedLinear(nn.Module):
    """A linear layer whose fp32 weight is cast to the activation's dtype at each call."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(_trunc_normal(torch.empty(d_out, d_in), 1 / math.sqrt(d_in)))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class CastedEmbedding(nn.Module):
    def __init__(self, num: int, dim: int, std: float, cast_to: torch.dtype) -> None:
        super().__init__()
        self.cast_to = cast_to
        self.embedding_weight = nn.Parameter(_trunc_normal(torch.empty(num, dim), std))

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.embedding_weight.to(self.cast_to))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, positions: int, theta: float) -> None:
        super().__init__()
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = nn.Buffer(emb.cos(), persistent=False)
        self.sin = nn.Buffer(emb.sin(), persistent=False)

    def forward(self) -> tuple[Tensor, Tensor]:
        return self.cos, self.sin


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x``: (batch, heads, seq, head_dim); RoPE in the table's dtype, back to ``x``'s."""
    dtype = x.dtype
    x = x.to(cos.dtype)
    return (x * cos + _rotate_half(x) * sin).to(dtype)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv_proj = CastedLinear(hidden, 3 * hidden)
        self.o_proj = CastedLinear(hidden, hidden)

    def forward(self, hidden_states: Tensor, cos_sin: tuple[Tensor, Tensor]) -> Tensor:
        qkv = self.qkv_proj(hidden_states)
        q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=self.heads)
        cos, sin = cos_sin
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        return self.o_proj(rearrange(out, "b h l d -> b l (h d)"))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, expansion: float) -> None:
        super().__init__()
        inner = -(-round(expansion * hidden * 2 / 3) // 64) * 64  # round up to a multiple of 64
        self.gate_up_proj = CastedLinear(hidden, 2 * inner)
        self.down_proj = CastedLinear(inner, hidden)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Post-norm: ``h = norm(h + attn(h))``, ``h = norm(h + mlp(h))``."""

    def __init__(self, cfg: TRMConfig) -> None:
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.expansion)

    def forward(self, hidden_states: Tensor, cos_sin: tuple[Tensor, Tensor]) -> Tensor:
        h = rms_norm(hidden_states + self.self_attn(hidden_states=hidden_states, cos_sin=cos_sin),
                     self.eps)
        return rms_norm(h + self.mlp(h), self.eps)


class ReasoningModule(nn.Module):
    def __init__(self, layers: list[Block]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden_states: Tensor, input_injection: Tensor, **kwargs) -> Tensor:
        hidden_states = hidden_states + input_injection
        for layer in self.layers:
            hidden_states = layer(hidden_states=hidden_states, **kwargs)
        return hidden_states


class TRMInner(nn.Module):
    def __init__(self, cfg: TRMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.forward_dtype = getattr(torch, cfg.forward_dtype)
        d = cfg.hidden_size
        self.embed_scale = math.sqrt(d)
        self.embed_tokens = CastedEmbedding(cfg.vocab_size, d, 1 / self.embed_scale,
                                            self.forward_dtype)
        self.puzzle_emb = CastedEmbedding(cfg.num_puzzles, cfg.puzzle_emb_len * d, 0.0,
                                          self.forward_dtype)
        self.lm_head = CastedLinear(d, cfg.vocab_size)
        self.q_head = CastedLinear(d, 2, bias=True)
        self.rotary_emb = Rotary(d // cfg.num_heads, cfg.seq_len + cfg.puzzle_emb_len,
                                 cfg.rope_theta)
        self.L_level = ReasoningModule([Block(cfg) for _ in range(cfg.L_layers)])
        self.H_init = nn.Buffer(_trunc_normal(torch.empty(d, dtype=self.forward_dtype), 1.0))
        self.L_init = nn.Buffer(_trunc_normal(torch.empty(d, dtype=self.forward_dtype), 1.0))
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)

    @property
    def total_len(self) -> int:
        return self.config.seq_len + self.config.puzzle_emb_len

    def _input_embeddings(self, inputs: Tensor, puzzle_ids: Tensor) -> Tensor:
        emb = self.embed_tokens(inputs.to(torch.int32))
        prefix = self.puzzle_emb(puzzle_ids).view(-1, self.config.puzzle_emb_len,
                                                  self.config.hidden_size)
        return self.embed_scale * torch.cat((prefix, emb), dim=-2)

    def empty_carry(self, batch_size: int) -> InnerCarry:
        shape = (batch_size, self.total_len, self.config.hidden_size)
        dev = self.H_init.device
        return InnerCarry(torch.empty(shape, dtype=self.forward_dtype, device=dev),
                          torch.empty(shape, dtype=self.forward_dtype, device=dev))

    def reset_carry(self, reset: Tensor, carry: InnerCarry) -> InnerCarry:
        flag = reset.view(-1, 1, 1)
        return InnerCarry(torch.where(flag, self.H_init, carry.z_H),
                          torch.where(flag, self.L_init, carry.z_L))

    def forward(self, carry: InnerCarry, batch: dict[str, Tensor]):
        seq_info = dict(cos_sin=self.rotary_emb())
        x = self._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
        z_H, z_L = carry.z_H, carry.z_L
        cfg = self.config
        with torch.no_grad():
            for _ in range(cfg.H_cycles - 1):
                for _ in range(cfg.L_cycles):
                    z_L = self.L_level(z_L, z_H + x, **seq_info)
                z_H = self.L_level(z_H, z_L, **seq_info)
        for _ in range(cfg.L_cycles):
            z_L = self.L_level(z_L, z_H + x, **seq_info)
        z_H = self.L_level(z_H, z_L, **seq_info)
        new_carry = InnerCarry(z_H=z_H.detach(), z_L=z_L.detach())
        logits = self.lm_head(z_H)[:, cfg.puzzle_emb_len:]
        q = self.q_head(z_H[:, 0]).to(torch.float32)
        return new_carry, logits, (q[..., 0], q[..., 1])


class TRM(nn.Module):
    """The ACT wrapper: one supervision step per call, halting on data."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = TRMConfig(**config)
        self.inner = TRMInner(self.config)

    def initial_carry(self, batch: dict[str, Tensor]) -> ACTCarry:
        n = batch["inputs"].shape[0]
        dev = batch["inputs"].device
        return ACTCarry(
            inner_carry=self.inner.empty_carry(n),
            steps=torch.zeros(n, dtype=torch.int32, device=dev),
            halted=torch.ones(n, dtype=torch.bool, device=dev),  # halted: reset on first use
            current_data={k: torch.empty_like(v) for k, v in batch.items()},
        )

    def forward(self, carry: ACTCarry, batch: dict[str, Tensor]):
        inner_carry = self.inner.reset_carry(carry.halted, carry.inner_carry)
        steps = torch.where(carry.halted, 0, carry.steps)
        data = {
            k: torch.where(carry.halted.view((-1,) + (1,) * (batch[k].ndim - 1)), batch[k], v)
            for k, v in carry.current_data.items()
        }
        inner_carry, logits, (q_halt, q_continue) = self.inner(inner_carry, data)
        outputs = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_continue}
        with torch.no_grad():
            steps = steps + 1
            halted = steps >= self.config.halt_max_steps
            if self.training and self.config.halt_max_steps > 1:
                halted = halted | (q_halt > 0)
                explore = torch.rand_like(q_halt) < self.config.halt_exploration_prob
                min_steps = explore * torch.randint_like(steps, 2, self.config.halt_max_steps + 1)
                halted = halted & (steps >= min_steps)
        return ACTCarry(inner_carry, steps, halted, data), outputs


class ACTLossHead(nn.Module):
    """Cross-entropy per token (mean per sequence) + 0.5 BCE(q_halt, sequence correct)."""

    def __init__(self, model: TRM) -> None:
        super().__init__()
        self.model = model

    def initial_carry(self, *args, **kwargs) -> ACTCarry:
        return self.model.initial_carry(*args, **kwargs)

    def forward(self, carry: ACTCarry, batch: dict[str, Tensor], return_keys=()):
        new_carry, outputs = self.model(carry, batch)
        labels = new_carry.current_data["labels"]
        logits = outputs["logits"].float()
        mask = labels != IGNORE
        counts = mask.sum(-1).clamp_min(1)
        per_tok = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                  reduction="none").view(labels.shape)
        lm_loss = (per_tok.sum(-1) / counts).sum()
        with torch.no_grad():
            correct = mask & (logits.argmax(-1) == labels)
            seq_correct = correct.sum(-1) == mask.sum(-1)
            metrics = {"count": new_carry.halted.sum(),
                       "accuracy": (correct.sum(-1) / counts).sum(),
                       "exact_accuracy": seq_correct.sum(),
                       "steps": new_carry.steps.sum()}
        q_loss = F.binary_cross_entropy_with_logits(
            outputs["q_halt_logits"], seq_correct.to(outputs["q_halt_logits"].dtype),
            reduction="sum")
        loss = lm_loss + 0.5 * q_loss
        detached = {k: outputs[k].detach() for k in return_keys if k in outputs}
        return new_carry, loss, metrics, detached, new_carry.halted.all()


def make_trm(seed: int = 0, **overrides) -> ACTLossHead:
    """The loss head around a TRM built from ``TRMConfig(**overrides)``, seeded, training mode."""
    torch.manual_seed(seed)
    return ACTLossHead(TRM(TRMConfig(**overrides).model_dump())).train()


def make_batch(cfg: TRMConfig, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(1, cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g)
    labels = torch.randint(2, cfg.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g)
    labels[:, : cfg.seq_len // 4] = IGNORE  # given cells are not supervised
    ids = torch.randint(0, cfg.num_puzzles, (cfg.batch_size,), generator=g)
    return {"inputs": inputs, "labels": labels, "puzzle_identifiers": ids}


class CastedLoop(nn.Module):
    """A model whose only shared module is a ``CastedLinear`` (bf16 by default)."""

    def __init__(self, d: int = 64, steps: int = 4, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.dtype = dtype
        self.steps = steps
        self.step = CastedLinear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        z = torch.zeros_like(x)
        for _ in range(self.steps):
            z = torch.tanh(self.step(z + x))
        return z.float()


class CastedWeightLoop(nn.Module):
    """One call applies its own weight, cast to bf16, in a Python loop (a parameter site)."""

    def __init__(self, d: int = 64, steps: int = 4) -> None:
        super().__init__()
        self.steps = steps
        self.weight = nn.Parameter(torch.randn(d, d) / math.sqrt(d))

    def forward(self, x: Tensor) -> Tensor:
        z = x.to(torch.bfloat16)
        for _ in range(self.steps):
            z = torch.tanh(F.linear(z, self.weight.to(z.dtype)) + x.to(z.dtype))
        return z.float()
