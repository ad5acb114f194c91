"""Quick start: compress a recursive model whose loop halts on data, in your own training loop.

The model is ordinary Python: a dataclass carry kept across calls, a shared block applied
until a learned halting score says stop (at most ``max_steps``), a user method
(`initial_carry`). `laser_fx.compress` finds the shared block by running the model once and
swaps it in place; the training loop does not change. Takes ~5 s on a CPU.

    python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import laser_fx


@dataclass
class Carry:
    z: Tensor  # the latent state, carried from one call to the next


class Block(nn.Module):
    """The weight-shared loop body."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        h = z + x
        return F.rms_norm(h + self.down(F.gelu(self.up(h))), (h.shape[-1],))


class HaltingModel(nn.Module):
    """Applies `block` until the halting head says stop (data-dependent), then reads out."""

    def __init__(self, vocab: int = 16, d: int = 64, max_steps: int = 8) -> None:
        super().__init__()
        self.max_steps = max_steps
        self.embed = nn.Embedding(vocab, d)
        self.block = Block(d)
        self.halt = nn.Linear(d, 1)
        nn.init.zeros_(self.halt.weight)  # as TRM: run to max_steps until halting is learned
        nn.init.constant_(self.halt.bias, -5.0)
        self.head = nn.Linear(d, vocab)

    def initial_carry(self, tokens: Tensor) -> Carry:
        return Carry(torch.zeros(*tokens.shape, self.embed.embedding_dim))

    def forward(self, carry: Carry, tokens: Tensor) -> tuple[Carry, Tensor]:
        x, z = self.embed(tokens), carry.z
        for _ in range(self.max_steps):
            z = self.block(z, x)
            if self.halt(z.mean(1)).mean() > 0:  # halts on data: no tracer captures this
                break
        return Carry(z.detach()), self.head(z)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train both arms in lockstep from the same weights; print memory and the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=32)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = HaltingModel()
    baseline = copy.deepcopy(model)  # only to compare against; you would not need it
    tokens = torch.randint(0, 16, (args.batch, args.seq))
    carry = model.initial_carry(tokens)

    laser_fx.compress(model, example_inputs=(carry, tokens))  # in place; returns `model`

    def loss_of(out: tuple[Carry, Tensor]) -> Tensor:
        return F.cross_entropy(out[1].flatten(0, 1), tokens.flatten())

    mem = {name: laser_fx.measure_activation_memory(m, (carry, tokens), loss_of)
           for name, m in (("baseline", baseline), ("laser_fx", model))}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(args.steps):  # your training loop, unchanged
        carry, logits = model(carry, tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(laser_fx.report(model))
    ratio = mem["laser_fx"].after_forward / mem["baseline"].after_forward
    print(f"activation memory after forward: {mem['baseline'].after_forward / 2**20:.2f} MiB "
          f"-> {mem['laser_fx'].after_forward / 2**20:.2f} MiB ({ratio:.3f}x); "
          f"final loss {loss.item():.3f}; model is still a {type(model).__name__}: "
          f"{callable(model.initial_carry)}")
    return {"memory_ratio": ratio, "loss": loss.item()}


if __name__ == "__main__":
    main()
