"""Training pieces of the TRM example: loss, EMA of weights, deep supervision, evaluation.

Moved out of ``model.py`` (which keeps the network) so each file stays small.

Example::

    ds = DeepSupervision(model.initial_carry, iterate_batches(x, y, 64, seed=0), max_steps=2)
    inputs, labels, y, z = ds.next()
    logits, q, y, z = model(inputs, y, z)
    loss, metrics = trm_loss(logits, labels, q)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from laser_fx.errors import ConfigError

__all__ = [
    "EMA",
    "DeepSupervision",
    "SupervisionStep",
    "evaluate",
    "predict",
    "stablemax_cross_entropy",
    "trm_loss",
]

# ------------------------------------------------------------------------------------ loss
def stablemax_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token -log stablemax(logits)[label] in float64; s(x) = x + 1 (x >= 0), 1 / (1 - x)."""
    x = logits.double()
    # clamp so the unused branch never divides by zero (its NaN grad would leak through where)
    s = torch.where(x >= 0, x + 1, 1 / (1 - x.clamp(max=0)))
    logp = torch.log(s / s.sum(-1, keepdim=True))
    return -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def trm_loss(
    logits: Tensor,
    labels: Tensor,
    q_halt_logits: Tensor,
    *,
    loss_type: str = "softmax",
    ignore_index: int = -100,
) -> tuple[Tensor, dict[str, float]]:
    """TRM loss: per-sequence mean token CE summed over the batch + 0.5 BCE(q_halt, exact), / batch.

    Args:
        logits: (B, L, V).
        labels: (B, L) token ids; `ignore_index` cells are not supervised.
        q_halt_logits: (B,).
        loss_type: "softmax" or "stablemax".
        ignore_index: label id to skip.

    Returns:
        (loss, metrics) with metrics loss, lm_loss, q_halt_loss, token_acc, exact_acc, q_halt_acc.
    """
    mask = labels != ignore_index
    safe = torch.where(mask, labels, 0)
    if loss_type == "softmax":
        tok = F.cross_entropy(logits.flatten(0, 1).float(), safe.flatten(), reduction="none")
        tok = tok.view_as(labels)
    elif loss_type == "stablemax":
        tok = stablemax_cross_entropy(logits, safe)
    else:
        raise ConfigError(f"`loss_type` must be 'softmax' or 'stablemax', got {loss_type!r}.")
    count = mask.sum(-1)
    lm_loss = (torch.where(mask, tok, 0).sum(-1) / count.clamp_min(1)).sum().to(logits.dtype)
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels) & mask
        exact = correct.sum(-1) == count
    q_loss = F.binary_cross_entropy_with_logits(
        q_halt_logits, exact.to(q_halt_logits.dtype), reduction="sum"
    )
    batch = labels.shape[0]
    loss = (lm_loss + 0.5 * q_loss) / batch
    metrics = {
        "loss": loss.item(),
        "lm_loss": lm_loss.item() / batch,
        "q_halt_loss": q_loss.item() / batch,
        "token_acc": (correct.sum() / mask.sum().clamp_min(1)).item(),
        "exact_acc": exact.float().mean().item(),
        "q_halt_acc": ((q_halt_logits > 0) == exact).float().mean().item(),
    }
    return loss, metrics


# ------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a model's floating-point parameters (TRM: decay 0.999).

    Example::

        ema = EMA(model)
        ...; opt.step(); ema.update(model)
        with ema.apply_to(model):
            evaluate(model, ...)
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"`decay` must be in [0, 1), got {decay}.")
        self.decay = decay
        self.shadow = {
            k: p.detach().clone() for k, p in model.named_parameters() if p.is_floating_point()
        }

    def _params(self, model: nn.Module) -> dict[str, Tensor]:
        params = dict(model.named_parameters())
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise ConfigError(
                f"EMA tracks parameters the model lacks: {missing[:5]}; use the model it was built from."
            )
        return params

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * parameter."""
        params = self._params(model)
        for k, s in self.shadow.items():
            s.lerp_(params[k].detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averages."""
        params = self._params(model)
        for k, s in self.shadow.items():
            params[k].copy_(s)

    @contextlib.contextmanager
    def apply_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context manager: the model holds the EMA weights inside, its own weights after."""
        params = self._params(model)
        backup = {k: params[k].detach().clone() for k in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, b in backup.items():
                    params[k].copy_(b)


# ----------------------------------------------------------------------- deep supervision
class SupervisionStep(NamedTuple):
    """What to feed the model for one supervision step."""

    inputs: Tensor
    labels: Tensor
    y: Tensor
    z: Tensor


class DeepSupervision:
    """Carry management for deep supervision with ACT halting (TRM training loop).

    Each call of `next()` is one supervision step: sequences that halted after the previous
    step are replaced by puzzles from a new batch (the rest of that batch is unused, as in
    the reference) and their carry is reset. `update()` takes the model's outputs and
    decides who halts: at `max_steps`, or (training only) when q_halt > 0, unless a minimum
    step count drawn with probability `exploration_prob` from [2, max_steps] forbids it.

    Args:
        initial_carry: batch_size -> (y, z), e.g. `TRM.initial_carry`.
        batches: endless iterator of (inputs, labels) of a fixed batch size.
        max_steps: supervision steps before a forced halt (16 in TRM).
        exploration_prob: probability of drawing a random minimum step count.
        training: False halts only at `max_steps`.
        seed: seed of the exploration draws.

    Example::

        ds = DeepSupervision(model.initial_carry, iterate_batches(x, y, 64, seed=0))
        for _ in range(steps):
            inputs, labels, y, z = ds.next()
            logits, q, y, z = model(inputs, y, z)
            loss, _ = trm_loss(logits, labels, q); loss.backward(); opt.step(); opt.zero_grad()
            ds.update(y, z, q)
    """

    def __init__(
        self,
        initial_carry: Callable[[int], tuple[Tensor, Tensor]],
        batches: Iterator[tuple[Tensor, Tensor]],
        *,
        max_steps: int = 16,
        exploration_prob: float = 0.1,
        training: bool = True,
        seed: int = 0,
    ):
        if max_steps < 1:
            raise ConfigError(f"`max_steps` must be >= 1, got {max_steps}.")
        self.initial_carry, self.batches = initial_carry, batches
        self.max_steps, self.exploration_prob, self.training = max_steps, exploration_prob, training
        self.generator = torch.Generator().manual_seed(seed)
        self.state: SupervisionStep | None = None
        self.steps: Tensor | None = None  # supervision steps taken by each current puzzle
        self.halted: Tensor | None = None
        self.finished = 0  # puzzles that halted so far

    def next(self) -> SupervisionStep:
        """The inputs, labels and carry for the next supervision step."""
        new_inputs, new_labels = next(self.batches)
        if self.state is None:
            y, z = self.initial_carry(new_inputs.shape[0])
            self.state = SupervisionStep(new_inputs, new_labels, y, z)
            self.steps = torch.zeros(new_inputs.shape[0], dtype=torch.long)
            return self.state
        h = self.halted
        if h is None:
            raise ConfigError("DeepSupervision.next() called twice without update(y, z, q_halt).")
        y0, z0 = self.initial_carry(h.shape[0])
        s = self.state
        hx, hy = h.to(s.inputs.device)[:, None], h.to(s.y.device)[:, None, None]
        self.state = SupervisionStep(
            torch.where(hx, new_inputs.to(s.inputs.device), s.inputs),
            torch.where(hx, new_labels.to(s.labels.device), s.labels),
            torch.where(hy, y0, s.y),
            torch.where(hy, z0, s.z),
        )
        self.steps = torch.where(h, 0, self.steps)
        self.halted = None
        return self.state

    def update(self, y: Tensor, z: Tensor, q_halt_logits: Tensor) -> Tensor:
        """Store the new carry and return the bool mask of sequences that halted."""
        if self.state is None or self.steps is None:
            raise ConfigError("DeepSupervision.update() called before next().")
        self.steps = self.steps + 1
        halted = self.steps >= self.max_steps
        if self.training and self.max_steps > 1:
            q = q_halt_logits.detach().cpu()
            halted = halted | (q > 0)
            explore = torch.rand(q.shape, generator=self.generator) < self.exploration_prob
            low = torch.randint(2, self.max_steps + 1, q.shape, generator=self.generator)
            halted = halted & (self.steps >= explore * low)
        self.state = self.state._replace(y=y.detach(), z=z.detach())
        self.halted = halted
        self.finished += int(halted.sum())
        return halted


@torch.no_grad()
def predict(
    model: nn.Module,
    inputs: Tensor,
    steps: int,
    initial_carry: Callable[[int], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Run `steps` supervision steps from a fresh carry (evaluation runs them all).

    Args:
        model: a TRM or any module with its call signature (e.g. a compressed one).
        inputs: LongTensor (B, L).
        steps: supervision steps.
        initial_carry: defaults to `model.initial_carry`.

    Returns:
        (logits, q_halt_logits) of the last step.
    """
    init = initial_carry if initial_carry is not None else model.initial_carry
    y, z = init(inputs.shape[0])
    for _ in range(steps):
        logits, q, y, z = model(inputs, y, z)
    return logits, q


def evaluate(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    steps: int = 16,
    batch_size: int = 256,
    initial_carry: Callable[[int], tuple[Tensor, Tensor]] | None = None,
) -> dict[str, float]:
    """Token and exact accuracy after `steps` supervision steps, in eval mode.

    Returns:
        {"token_acc", "exact_acc"} over all examples.
    """
    was_training = model.training
    model.eval()
    correct = exact = 0
    try:
        for i in range(0, inputs.shape[0], batch_size):
            logits, _ = predict(model, inputs[i : i + batch_size], steps, initial_carry)
            hit = logits.argmax(-1) == labels[i : i + batch_size]
            correct += int(hit.sum())
            exact += int(hit.all(-1).sum())
    finally:
        model.train(was_training)
    return {"token_acc": correct / labels.numel(), "exact_acc": exact / labels.shape[0]}
