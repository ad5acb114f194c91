"""Shared pieces of the Hugging Face examples: generated batches, interleaved baseline-vs-LASER
training with timing, held-out evaluation, activation memory and the printed summary.

The examples (`hf_albert.py`, `hf_looped_llama.py`) build a small weight-shared transformer
from a config (random weights, nothing downloaded), train an uncompressed model and a deep
copy of it compressed in place by `laser_fx.compress` (same initial weights) on the same
batches, and print what LASER changed: activation memory kept for backward, step time and
held-out loss / accuracy. Nothing is traced: `compress` runs the Hugging Face model once
eagerly on the example keyword inputs and swaps its shared layer for a `laser_fx.SiteWrapper`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm import tqdm

import laser_fx

__all__ = [
    "Batch",
    "Comparison",
    "LossFn",
    "Summary",
    "activation_memory",
    "add_common_args",
    "build_arms",
    "endless_batches",
    "evaluate",
    "print_summary",
    "torch_threads",
    "train_interleaved",
]


class Batch(NamedTuple):
    """One batch: keyword inputs of the model and the targets of the loss."""

    inputs: dict[str, torch.Tensor]
    target: torch.Tensor


class Summary(NamedTuple):
    """What an example's ``main`` returns: the figures it printed, for tests and notebooks.

    ``compressed`` maps each compressed site to its mechanism; ``compress_seconds`` is the
    wall time of `laser_fx.compress` (probe run, swap, one verification run).
    """

    memory_ratio: float
    step_time_ratio: float
    held_out: dict[str, tuple[float, float]]
    sites: list[laser_fx.Site]
    compressed: dict[str, str]
    compress_seconds: float


#: ``loss_fn(model_output, target) -> (mean loss, number correct, number counted)``
LossFn = Callable[[Any, torch.Tensor], tuple[torch.Tensor, int, int]]


def add_common_args(parser: argparse.ArgumentParser, *, steps: int) -> None:
    """Add ``--steps``, ``--quick``, ``--seed``, ``--mode``, ``--lr``, ``--threads`` to a parser.

    Args:
        parser: the example's argument parser.
        steps: default number of training steps.
    """
    parser.add_argument("--steps", type=int, default=steps, help="training steps per arm")
    parser.add_argument("--quick", action="store_true",
                        help="tiny run (a few steps, small batches) for tests")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument("--mode", choices=laser_fx.config.MODES, default="auto",
                        help="LASER mechanism (LaserConfig.mode)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: these small ops run fastest on a shared box)")


def endless_batches(make_batch: Callable[..., Batch], gen: torch.Generator,
                    *args: Any) -> Iterator[Batch]:
    """``make_batch(gen, *args)`` forever: the training stream of an example."""
    while True:
        yield make_batch(gen, *args)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_arms(
    model: nn.Module, example: Batch, config: laser_fx.LaserConfig
) -> tuple[nn.Module, nn.Module]:
    """The baseline and the LASER arm, from the same initial weights.

    Args:
        model: the (seeded) model; it becomes the baseline, unchanged.
        example: keyword inputs the compressed copy is probed and checked on.
        config: the LASER config.

    Returns:
        ``(model, laser)``: ``laser`` is a deep copy of ``model`` compressed in place.
    """
    laser = copy.deepcopy(model)
    laser_fx.compress(laser, config=config, example_kwargs=example.inputs)
    return model, laser


@dataclass
class Comparison:
    """Per-step training losses and step times of the two arms."""

    losses: dict[str, list[float]] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)

    def median_time(self, arm: str, skip: int) -> float:
        """Median step time of ``arm`` in seconds, leaving out the first ``skip`` (warm-up)."""
        t = self.times[arm]
        return statistics.median(t[skip:] if len(t) > skip else t)


def _step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch, loss_fn: LossFn) -> float:
    opt.zero_grad(set_to_none=True)
    loss, _, _ = loss_fn(model(**batch.inputs), batch.target)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_interleaved(
    arms: dict[str, nn.Module],
    batches: Iterator[Batch],
    loss_fn: LossFn,
    *,
    steps: int,
    lr: float,
    desc: str = "train",
) -> Comparison:
    """Train every arm on the same batches, one step of each per batch, in alternating order.

    Interleaving puts both arms under the same machine load (other processes, thermal state),
    so the step-time ratio compares like with like; the order alternates so that neither arm
    always runs on a warm cache.

    Args:
        arms: ``name -> model`` (a compressed model trains its own parameters).
        batches: an endless iterator of batches.
        loss_fn: see `LossFn`.
        steps: number of batches.
        lr: AdamW learning rate (same for every arm).
        desc: progress bar label.

    Returns:
        The `Comparison` of losses and step times.
    """
    opts = {name: torch.optim.AdamW(model.parameters(), lr=lr) for name, model in arms.items()}
    out = Comparison({n: [] for n in arms}, {n: [] for n in arms})
    names = list(arms)
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False)
    for i in bar:
        batch = next(batches)
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            out.losses[name].append(_step(arms[name], opts[name], batch, loss_fn))
            out.times[name].append(time.perf_counter() - t0)
        bar.set_postfix({n: f"{out.losses[n][-1]:.3f}" for n in names})
    for model in arms.values():
        model.zero_grad(set_to_none=True)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], loss_fn: LossFn) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on held-out ``batches``, in eval mode.

    Returns:
        ``(loss, accuracy)``; the loss is averaged over batches weighted by counted items.
    """
    was_training = model.training
    model.eval()  # a compressed model is the user's own: eval() reaches every layer
    total, correct, count = 0.0, 0, 0
    try:
        for b in batches:
            loss, c, n = loss_fn(model(**b.inputs), b.target)
            total += float(loss) * n
            correct += c
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1), correct / max(count, 1)


def activation_memory(model: nn.Module, batch: Batch, loss_fn: LossFn) -> laser_fx.ActivationMemory:
    """`laser_fx.measure_activation_memory` of one training step of ``model`` on ``batch``."""
    mem = laser_fx.measure_activation_memory(
        model, (), lambda out: loss_fn(out, batch.target)[0], kwargs=batch.inputs
    )
    model.zero_grad(set_to_none=True)
    return mem


def print_summary(
    *,
    base_mem: laser_fx.ActivationMemory,
    laser_mem: laser_fx.ActivationMemory,
    comparison: Comparison,
    held_out: dict[str, tuple[float, float]],
    metric: str,
) -> tuple[float, float]:
    """Print memory, step time and held-out figures of both arms.

    Args:
        base_mem: baseline activation memory.
        laser_mem: LASER activation memory.
        comparison: training record from `train_interleaved` (arms "baseline" and "laser").
        held_out: ``arm -> (loss, accuracy)`` on held-out data.
        metric: what the accuracy counts (printed).

    Returns:
        ``(LASER / baseline activation bytes kept for backward, LASER / baseline step time)``.
    """
    ratio = laser_mem.ratio_to(base_mem)
    skip = min(5, max(len(comparison.times["baseline"]) // 5, 0))
    t_base = comparison.median_time("baseline", skip)
    t_laser = comparison.median_time("laser", skip)
    mib = 2.0**20
    print("\nActivation memory kept for backward (laser_fx.measure_activation_memory):")
    print(f"  baseline : {base_mem.after_forward / mib:8.2f} MiB  (peak {base_mem.peak / mib:.2f} MiB)")
    print(f"  LASER    : {laser_mem.after_forward / mib:8.2f} MiB  (peak {laser_mem.peak / mib:.2f} MiB)")
    print(f"activation memory ratio (LASER / baseline): {ratio:.3f}x")
    print(f"step time (median, interleaved): baseline {t_base * 1e3:.1f} ms, "
          f"LASER {t_laser * 1e3:.1f} ms, ratio {t_laser / t_base:.2f}x")
    print(f"held-out ({metric}):")
    for arm, (loss, acc) in held_out.items():
        print(f"  {arm:<9}: loss {loss:.4f}  accuracy {acc:.4f}")
    return ratio, t_laser / t_base


def compare(
    model: nn.Module,
    example: Batch,
    held_out: list[Batch],
    batches: Iterator[Batch],
    loss_fn: LossFn,
    a: argparse.Namespace,
    *,
    desc: str,
    metric: str,
) -> Summary:
    """Print the sites, train baseline and LASER interleaved, and print the comparison."""
    print("\nWeight-shared sites (laser_fx.find_sites):")
    sites = laser_fx.find_sites(model, (), example.inputs)
    for site in sites:
        print(f"  {site}")
    config = laser_fx.LaserConfig(mode=a.mode)
    t0 = time.perf_counter()
    baseline, laser = build_arms(model, example, config)
    seconds = time.perf_counter() - t0
    compressed = {row["name"]: row["mechanism"] for row in laser_fx.report(laser).sites}
    print(f"\ncompressed in place in {seconds:.2f} s (probe run, swap, one check run; LASER "
          f"mode {a.mode}): " + ", ".join(f"{n} ({m})" for n, m in compressed.items()))
    arms = {"baseline": baseline, "laser": laser}
    record = train_interleaved(arms, batches, loss_fn, steps=a.steps, lr=a.lr, desc=desc)
    print(f"final training loss: baseline {record.losses['baseline'][-1]:.4f}, "
          f"LASER {record.losses['laser'][-1]:.4f}")
    base_mem = activation_memory(baseline, example, loss_fn)
    laser_mem = activation_memory(laser, example, loss_fn)
    report = laser_fx.report(laser)  # the bytes of the measured step above
    scores = {"baseline": evaluate(baseline, held_out, loss_fn),
              "LASER": evaluate(laser, held_out, loss_fn)}
    print("\nLASER report:")
    print(report)
    ratio, slowdown = print_summary(base_mem=base_mem, laser_mem=laser_mem, comparison=record,
                                    held_out=scores, metric=metric)
    return Summary(ratio, slowdown, scores, sites, compressed, seconds)
