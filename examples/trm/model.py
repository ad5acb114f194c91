"""The Tiny Recursive Model (TRM, arXiv 2510.04871), written to be traceable by torch.fx.

One shared network ``net`` (2 post-norm blocks) is applied n times to update the latent z
(``z = net(z, y + x)``) and once to update the answer y (``y = net(y, z)``), per cycle; T cycles
make one supervision step, the first T-1 under ``torch.no_grad()``. ``TRM.forward`` is one
supervision step on an explicit carry (y, z), so it has no data-dependent control flow.

Choices where the reference leaves room (documented here once):

- SwiGLU inner width: ``round(expansion * width * 2 / 3)`` rounded up to a multiple of 256
  when width >= 256 (as in TRM: 1536 for D=512), else of 64 (192 for D=64) so small models
  stay small.
- ``mlp_t`` mixes tokens with a SwiGLU whose in/out width is the sequence length incl. the
  prefix (inner width by the same rule).
- The puzzle-embedding prefix is one learned (zero-init) prefix shared by all puzzles: the
  generated puzzles carry no identifiers (the reference's Sudoku ids are all one id too).
- All linears: no bias, truncated normal std 1/sqrt(fan_in); initial y, z: truncated normal
  std 1 buffers.
- Loss (in ``training.py``): softmax cross-entropy by default; ``loss_type="stablemax"`` is the reference's choice
  (computed in float64).

Example::

    cfg = TRMConfig(vocab_size=8, seq_len=36)
    model = TRM(cfg)
    y, z = model.initial_carry(tokens.shape[0])
    logits, q_halt, y, z = model(tokens, y, z)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from laser_fx.errors import ConfigError

__all__ = [
    "RecursiveNet",
    "TRM",
    "TRMConfig",
    "swiglu_hidden",
]


def swiglu_hidden(width: int, expansion: float) -> int:
    """SwiGLU inner width: round(expansion * width * 2/3) rounded up to 64 (256 when width >= 256)."""
    multiple = 256 if width >= 256 else 64
    return -(-round(expansion * width * 2 / 3) // multiple) * multiple


@dataclass(frozen=True)
class TRMConfig:
    """Shape and recursion of a TRM, validated when built.

    Args:
        vocab_size: token ids incl. pad.
        seq_len: tokens per puzzle (without prefix).
        hidden_size: model width D.
        num_heads: attention heads (mixer "attn").
        expansion: SwiGLU expansion.
        n: z-updates per cycle.
        T: cycles per supervision step (the first T - grad_cycles without grad).
        grad_cycles: how many of the last cycles run with grad (backprop through them):
            1 is TRM's (the gradient through the last cycle only), T is full backprop
            through the recursion; the number of grad-enabled block calls is
            ``grad_cycles * (n + 1)``.
        num_blocks: blocks in the shared net.
        mixer: "attn" (non-causal attention) or "mlp_t" (SwiGLU over the sequence axis).
        pos_encoding: "rope", "learned", "none" or "auto" (rope for attn, none for mlp_t).
        puzzle_emb_len: learned prefix positions (0: none).
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
    """

    vocab_size: int
    seq_len: int
    hidden_size: int = 64
    num_heads: int = 4
    expansion: float = 4.0
    n: int = 3
    T: int = 2
    grad_cycles: int = 1
    num_blocks: int = 2
    mixer: str = "attn"
    pos_encoding: str = "auto"
    puzzle_emb_len: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "hidden_size", "num_heads", "n", "T", "num_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if not 1 <= self.grad_cycles <= self.T:
            raise ConfigError(
                f"`grad_cycles` must be in [1, T={self.T}] (1: gradient through the last cycle "
                f"only, T: through every cycle), got {self.grad_cycles}."
            )
        if self.puzzle_emb_len < 0:
            raise ConfigError(f"`puzzle_emb_len` must be >= 0, got {self.puzzle_emb_len}.")
        if self.mixer not in ("attn", "mlp_t"):
            raise ConfigError(f"`mixer` must be 'attn' or 'mlp_t', got {self.mixer!r}.")
        if self.pos_encoding not in ("auto", "rope", "learned", "none"):
            raise ConfigError(
                f"`pos_encoding` must be 'auto', 'rope', 'learned' or 'none', got {self.pos_encoding!r}."
            )
        if self.positions == "rope" and self.mixer != "attn":
            raise ConfigError(
                "`pos_encoding='rope'` needs `mixer='attn'`; use 'learned' or 'none'."
            )
        if self.mixer == "attn" and (self.hidden_size % self.num_heads or self.head_dim % 2):
            raise ConfigError(
                f"`hidden_size` ({self.hidden_size}) must split into `num_heads` ({self.num_heads})"
                " heads of even size."
            )

    @property
    def positions(self) -> str:
        """The positional encoding in use ("auto" resolved)."""
        if self.pos_encoding == "auto":
            return "rope" if self.mixer == "attn" else "none"
        return self.pos_encoding

    @property
    def total_len(self) -> int:
        """Sequence length seen by the net: prefix + puzzle."""
        return self.seq_len + self.puzzle_emb_len

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out, bias=False)
    nn.init.trunc_normal_(layer.weight, std=fan_in**-0.5, a=-2 * fan_in**-0.5, b=2 * fan_in**-0.5)
    return layer


def _rms_norm(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class SwiGLU(nn.Module):
    """silu(gate) * up, projected back; gate and up come from one fused linear."""

    def __init__(self, width: int, expansion: float):
        super().__init__()
        self.inner = swiglu_hidden(width, expansion)
        self.gate_up = _linear(width, 2 * self.inner)
        self.down = _linear(self.inner, width)

    def forward(self, x: Tensor) -> Tensor:
        gu = self.gate_up(x)
        # slicing by a config constant (not chunk + unpacking) keeps fx symbolic tracing happy
        return self.down(F.silu(gu[..., : self.inner]) * gu[..., self.inner :])


class Attention(nn.Module):
    """Non-causal multi-head attention, RoPE on q and k when configured."""

    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.heads, self.head_dim, self.seq = cfg.num_heads, cfg.head_dim, cfg.total_len
        self.use_rope = cfg.positions == "rope"
        self.qkv = _linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = _linear(cfg.hidden_size, cfg.hidden_size)
        inv_freq = cfg.rope_theta ** (-torch.arange(0, self.head_dim, 2).double() / self.head_dim)
        angles = torch.outer(torch.arange(self.seq).double(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)[:, None, :]  # (S, 1, head_dim)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def _rope(self, t: Tensor) -> Tensor:
        half = self.head_dim // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        return t * self.cos + rotated * self.sin

    def forward(self, h: Tensor) -> Tensor:
        qkv = self.qkv(h).view(-1, self.seq, 3, self.heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.use_rope:
            q, k = self._rope(q), self._rope(k)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out(o.transpose(1, 2).reshape(-1, self.seq, self.heads * self.head_dim))


class TokenMLP(nn.Module):
    """`mlp_t`: a SwiGLU across the sequence axis (prefix included)."""

    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.mlp = SwiGLU(cfg.total_len, cfg.expansion)

    def forward(self, h: Tensor) -> Tensor:
        return self.mlp(h.transpose(1, 2)).transpose(1, 2)


class Block(nn.Module):
    """Post-norm block: h = norm(h + mix(h)); h = norm(h + swiglu(h))."""

    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.mix = Attention(cfg) if cfg.mixer == "attn" else TokenMLP(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.expansion)

    def forward(self, h: Tensor) -> Tensor:
        h = _rms_norm(h + self.mix(h), self.eps)
        return _rms_norm(h + self.mlp(h), self.eps)


class RecursiveNet(nn.Module):
    """The one shared network: adds the injection, then runs the blocks."""

    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))

    def forward(self, h: Tensor, injection: Tensor) -> Tensor:
        h = h + injection
        for block in self.blocks:
            h = block(h)
        return h


class TRM(nn.Module):
    """Tiny Recursive Model; `forward` is one supervision step on the carry (y, z)."""

    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.embed_scale = math.sqrt(d)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        nn.init.trunc_normal_(self.embed_tokens.weight, std=d**-0.5, a=-2 * d**-0.5, b=2 * d**-0.5)
        if cfg.puzzle_emb_len:
            self.puzzle_prefix = nn.Parameter(torch.zeros(cfg.puzzle_emb_len, d))
        if cfg.positions == "learned":
            self.pos_embedding = nn.Parameter(torch.randn(cfg.total_len, d) * d**-0.5)
        self.net = RecursiveNet(cfg)
        self.lm_head = _linear(d, cfg.vocab_size)
        self.q_head = nn.Linear(d, 1)
        with torch.no_grad():  # halting starts at "never halt" (sigmoid(-5) ~ 0.007)
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        self.register_buffer("y_init", nn.init.trunc_normal_(torch.empty(d), std=1.0, a=-2, b=2))
        self.register_buffer("z_init", nn.init.trunc_normal_(torch.empty(d), std=1.0, a=-2, b=2))

    def initial_carry(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Fresh (y, z) of shape (batch_size, total_len, D)."""
        shape = (batch_size, self.config.total_len, self.config.hidden_size)
        return self.y_init.expand(shape).clone(), self.z_init.expand(shape).clone()

    def _embed(self, tokens: Tensor) -> Tensor:
        x = self.embed_tokens(tokens)
        if self.config.puzzle_emb_len:
            x = torch.cat([self.puzzle_prefix.unsqueeze(0).expand(tokens.size(0), -1, -1), x], 1)
        if self.config.positions == "learned":
            x = 0.7071067811865476 * (x + self.pos_embedding)  # keeps the sum's scale
        return self.embed_scale * x

    def _cycle(self, x: Tensor, y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        for _ in range(self.config.n):
            z = self.net(z, y + x)
        return self.net(y, z), z

    def forward(
        self, tokens: Tensor, y: Tensor, z: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One supervision step.

        Args:
            tokens: LongTensor (B, seq_len).
            y: answer carry (B, total_len, D) (see `initial_carry`).
            z: latent carry (B, total_len, D).

        Returns:
            (logits (B, seq_len, vocab), q_halt_logits (B,), y, z) with the carry detached.
        """
        x = self._embed(tokens)
        free = self.config.T - self.config.grad_cycles
        if free > 0:
            with torch.no_grad():
                for _ in range(free):
                    y, z = self._cycle(x, y, z)
        for _ in range(self.config.grad_cycles):
            y, z = self._cycle(x, y, z)
        logits = self.lm_head(y[:, self.config.puzzle_emb_len :])
        q_halt = self.q_head(y[:, 0])[:, 0]
        return logits, q_halt, y.detach(), z.detach()
