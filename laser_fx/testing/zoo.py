"""Small deterministic models that exercise tracing, site finding and compression.

Every model is built by a function with keyword size arguments; `ZOO` maps a name to a
factory returning ``(model, example_inputs)``. Weights are drawn from a private RNG
stream (``seed``), so building a model never disturbs the caller's global RNG.

Models whose forward has no data-dependent Python control flow are traceable by
`laser_fx.trace` (fx with grad-mode recording); `DataDependentLoop` is the one that is not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "NEGATIVE",
    "TRACEABLE",
    "WEIGHT_SHARED",
    "ZOO",
    "DataDependentLoop",
    "GradModesModel",
    "LoopedTransformer",
    "PlainMLP",
    "RecursiveConvRefiner",
    "TRMLike",
    "UnrolledRNN",
    "make_inputs",
    "swiglu_hidden",
]


def swiglu_hidden(width: int, expansion: float) -> int:
    """SwiGLU hidden width: ``round(expansion * width * 2 / 3)`` rounded up to a multiple of 64.

    Args:
        width: input width of the SwiGLU.
        expansion: the nominal MLP expansion factor.

    Returns:
        The hidden width (>= 64).
    """
    h = round(expansion * width * 2 / 3)
    return max(64, -(-h // 64) * 64)


def _rms_norm(h: Tensor) -> Tensor:
    # weightless RMSNorm, as in TRM's post-norm blocks
    return F.rms_norm(h, (h.shape[-1],), eps=1e-5)


class _SwiGLU(nn.Module):
    def __init__(self, width: int, expansion: float) -> None:
        super().__init__()
        hidden = swiglu_hidden(width, expansion)
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(h)) * self.up(h))


class _Attention(nn.Module):
    """Non-causal multi-head self-attention with q/k/v/o projections (no bias)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"`d` ({d}) must be divisible by `heads` ({heads}).")
        self.heads, self.head_dim = heads, d // heads
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def _split(self, t: Tensor) -> Tensor:
        # unflatten instead of view(B, L, ...) keeps the code free of shape unpacking under fx
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, h: Tensor) -> Tensor:
        q, k, v = self._split(self.q(h)), self._split(self.k(h)), self._split(self.v(h))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).flatten(-2))


class _SeqMLP(nn.Module):
    """TRM's "MLP-t" token mixer: a SwiGLU over the sequence axis."""

    def __init__(self, seq: int, expansion: float) -> None:
        super().__init__()
        self.mlp = _SwiGLU(seq, expansion)

    def forward(self, h: Tensor) -> Tensor:
        return self.mlp(h.transpose(1, 2)).transpose(1, 2)


class _PostNormBlock(nn.Module):
    def __init__(self, d: int, seq: int, mixer: str, heads: int, expansion: float) -> None:
        super().__init__()
        if mixer == "attn":
            self.mix: nn.Module = _Attention(d, heads)
        elif mixer == "mlp_t":
            self.mix = _SeqMLP(seq, expansion)
        else:
            raise ValueError(f"`mixer` must be 'attn' or 'mlp_t', got {mixer!r}.")
        self.mlp = _SwiGLU(d, expansion)

    def forward(self, h: Tensor) -> Tensor:
        h = _rms_norm(h + self.mix(h))
        return _rms_norm(h + self.mlp(h))


class _TRMNet(nn.Module):
    """The one shared network of a TRM: input injection, then two post-norm blocks."""

    def __init__(self, d: int, seq: int, mixer: str, heads: int, expansion: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [_PostNormBlock(d, seq, mixer, heads, expansion) for _ in range(2)]
        )

    def forward(self, h: Tensor, inject: Tensor) -> Tensor:
        h = h + inject
        for block in self.blocks:
            h = block(h)
        return h


class TRMLike(nn.Module):
    """A Tiny Recursive Model: one shared `net` applied ``(n + 1) * T`` times per forward.

    The first ``T - 1`` cycles run under ``torch.no_grad()``; only the last keeps
    activations for backward. Input: Long ``[B, seq]`` tokens; output ``[B, seq, vocab]``.
    """

    def __init__(
        self,
        d: int = 64,
        seq: int = 16,
        vocab: int = 12,
        n: int = 3,
        T: int = 2,
        mixer: str = "attn",
        heads: int = 4,
        expansion: float = 4,
    ) -> None:
        super().__init__()
        if n < 1 or T < 1:
            raise ValueError(f"`n` and `T` must be >= 1, got n={n}, T={T}.")
        self.d, self.seq, self.vocab, self.n, self.T = d, seq, vocab, n, T
        self.embed = nn.Embedding(vocab, d)
        self.net = _TRMNet(d, seq, mixer, heads, expansion)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("y_init", torch.randn(d) * 0.5)
        self.register_buffer("z_init", torch.randn(d) * 0.5)

    def _cycle(self, x: Tensor, y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        for _ in range(self.n):
            z = self.net(z, y + x)
        y = self.net(y, z)
        return y, z

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) * math.sqrt(self.d)
        y, z = self.y_init.expand_as(x), self.z_init.expand_as(x)
        for _ in range(self.T - 1):
            with torch.no_grad():
                y, z = self._cycle(x, y, z)
        y, z = self._cycle(x, y, z)
        return self.lm_head(y)

    def _zoo_inputs(self, batch: int, g: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randint(0, self.vocab, (batch, self.seq), generator=g),)


class _PreNormBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.norm1(h))
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))


class LoopedTransformer(nn.Module):
    """Pre-norm transformer block(s) applied ``loops`` times with shared weights.

    Input: float ``[B, L, d]``; output ``[B, L, d]``.
    """

    def __init__(self, d: int = 64, heads: int = 4, layers: int = 1, loops: int = 4) -> None:
        super().__init__()
        self.d, self.loops = d, loops
        self.layers = nn.ModuleList([_PreNormBlock(d, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)

    def forward(self, h: Tensor) -> Tensor:
        for _ in range(self.loops):
            for layer in self.layers:
                h = layer(h)
        return self.norm(h)

    def _zoo_inputs(self, batch: int, g: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randn(batch, 8, self.d, generator=g),)


class _RNNCell(nn.Module):
    def __init__(self, d_in: int, d_hidden: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d_hidden)
        self.hid = nn.Linear(d_hidden, d_hidden)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return torch.tanh(self.inp(x) + self.hid(h))


class UnrolledRNN(nn.Module):
    """An RNN cell (two linears + tanh) unrolled over ``steps`` time steps.

    Input: float ``[B, steps, d_in]``; output ``[B, steps, d_in]`` (a readout per step).
    """

    def __init__(self, d_in: int = 8, d_hidden: int = 32, steps: int = 6) -> None:
        super().__init__()
        self.d_in, self.steps = d_in, steps
        self.cell = _RNNCell(d_in, d_hidden)
        self.readout = nn.Linear(d_hidden, d_in)
        self.register_buffer("h0", torch.zeros(d_hidden))

    def forward(self, x: Tensor) -> Tensor:
        # broadcasting, not self.h0.expand(x.shape[0], -1): fx cannot pass a traced size to
        # a method of a concrete buffer
        h = torch.zeros_like(x[:, 0, :1]) + self.h0
        states = []
        for t in range(self.steps):
            h = self.cell(x[:, t], h)
            states.append(h)
        return self.readout(torch.stack(states, dim=1))

    def _zoo_inputs(self, batch: int, g: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randn(batch, self.steps, self.d_in, generator=g),)


class _ConvBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        # GroupNorm, not BatchNorm: no running statistics, so a train-mode call has no side effect
        self.norm = nn.GroupNorm(2, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.conv2(F.gelu(self.norm(self.conv1(h))))


class RecursiveConvRefiner(nn.Module):
    """A residual conv block applied ``iters`` times to an image ``[B, 3, size, size]``."""

    def __init__(self, channels: int = 8, iters: int = 3, size: int = 8) -> None:
        super().__init__()
        self.iters, self.size = iters, size
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.block = _ConvBlock(channels)
        self.head = nn.Conv2d(channels, 3, 1)

    def forward(self, img: Tensor) -> Tensor:
        h = self.stem(img)
        for _ in range(self.iters):
            h = self.block(h)
        return self.head(h)

    def _zoo_inputs(self, batch: int, g: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randn(batch, 3, self.size, self.size, generator=g),)


class PlainMLP(nn.Module):
    """Three different linears, no weight sharing (negative case for site finding)."""

    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 4) -> None:
        super().__init__()
        self.d_in = d_in
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def _zoo_inputs(self, batch: int, g: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randn(batch, self.d_in, generator=g),)


class DataDependentLoop(nn.Module):
    """A shared block looped until a tensor value says stop: not capturable as a graph."""

    def __init__(self, d: int = 16, max_steps: int = 8) -> None:
        super().__init__()
        self.d, self.max_steps = d, max_steps
        self.body = nn.Sequential(nn.Linear(d, d), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for _ in range(self.max_steps):
            h = self.body(h)
            if h.mean() > 0:  # data-dependent: the number of steps depends on values
                break
        return h

    def _zoo_inputs(self, batch: int, g: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randn(batch, self.d, generator=g),)


class GradModesModel(nn.Module):
    """One shared linear used under every grad-mode construct torch offers.

    `torch.no_grad()` / `torch.no_grad` / `torch.set_grad_enabled(False)` as decorators,
    `torch.set_grad_enabled(False)` and `torch.enable_grad()` as context managers (the
    latter nested inside the former), and `torch.set_grad_enabled` called as a function.
    A tracer that drops any of them gets different parameter gradients.
    """

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.d = d
        self.lin = nn.Linear(d, d)

    @torch.no_grad()
    def _refine_called(self, h: Tensor) -> Tensor:
        return self.lin(h)

    @torch.no_grad
    def _refine_bare(self, h: Tensor) -> Tensor:
        return torch.tanh(self.lin(h))

    @torch.set_grad_enabled(False)
    def _refine_set(self, h: Tensor) -> Tensor:
        return self.lin(h) * 0.5

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        w = self._refine_called(h) + self._refine_bare(h) + self._refine_set(h)
        with torch.set_grad_enabled(False):
            u = self.lin(h)
            with torch.enable_grad():
                v = self.lin(u)  # grad flows into lin here despite the outer region
            u2 = self.lin(v)
        torch.set_grad_enabled(False)
        s = self.lin(x)
        torch.set_grad_enabled(True)
        return h * w + v * u2 + s + self.lin(torch.tanh(h))

    def _zoo_inputs(self, batch: int, g: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randn(batch, self.d, generator=g),)


def make_inputs(model: nn.Module, *, batch: int = 2, seed: int = 0) -> tuple[Tensor, ...]:
    """Deterministic example inputs for a zoo model.

    Args:
        model: a model from this module.
        batch: batch size.
        seed: seed of the private RNG stream the inputs are drawn from.

    Returns:
        The positional inputs of ``model.forward``.
    """
    make = getattr(model, "_zoo_inputs", None)
    if make is None:
        raise TypeError(f"{type(model).__name__} is not a laser_fx.testing.zoo model.")
    return make(batch, torch.Generator().manual_seed(seed))


def _factory(cls: type[nn.Module], **fixed: object) -> Callable[..., tuple[nn.Module, tuple]]:
    def build(*, seed: int = 0, batch: int = 2, **sizes: object) -> tuple[nn.Module, tuple]:
        # fork_rng: the weights come from their own stream and the caller's RNG is untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(**{**fixed, **sizes})
        return model, make_inputs(model, batch=batch, seed=seed)

    build.__name__ = f"make_{cls.__name__}"
    build.__doc__ = f"Build `{cls.__name__}` ({fixed or 'defaults'}); returns (model, inputs)."
    return build


#: name -> factory(*, seed=0, batch=2, **sizes) -> (model, example_inputs)
ZOO: dict[str, Callable[..., tuple[nn.Module, tuple]]] = {
    "trm_attn": _factory(TRMLike, mixer="attn"),
    "trm_mlp_t": _factory(TRMLike, mixer="mlp_t"),
    "looped_transformer": _factory(LoopedTransformer),
    "unrolled_rnn": _factory(UnrolledRNN),
    "recursive_conv": _factory(RecursiveConvRefiner),
    "grad_modes": _factory(GradModesModel),
    "plain_mlp": _factory(PlainMLP),
    "data_dependent_loop": _factory(DataDependentLoop),
}

#: zoo models that apply some parameter more than once
WEIGHT_SHARED = (
    "trm_attn",
    "trm_mlp_t",
    "looped_transformer",
    "unrolled_rnn",
    "recursive_conv",
    "grad_modes",
)
#: zoo models that `laser_fx.trace` captures
TRACEABLE = (*WEIGHT_SHARED, "plain_mlp")
#: name -> why the model is a negative case
NEGATIVE = {
    "plain_mlp": "no weight sharing",
    "data_dependent_loop": "data-dependent control flow",
}
