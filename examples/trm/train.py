"""Train a Tiny Recursive Model on Sudoku or mazes, with and without LASER, and compare.

Both arms start from the same initial weights and see the same batches; they train in
lockstep (one step of each, alternating) so their step times are measured under the same
machine load. The LASER arm is a deep copy of the baseline compressed IN PLACE by
``laser_fx.compress(twin, example_inputs=...)``: it stays a `TRM` (``initial_carry``, its
state dict keys, train/eval) whose shared block ``net`` is swapped for a wrapper; its
optimizer is built on its own ``parameters()``.

Usage::

    PYTHONPATH=. python examples/trm/train.py --quick
    PYTHONPATH=. python examples/trm/train.py --task maze --size 7 --mixer attn --steps 300 \\
        --seeds 0 1 --out results/maze.json

``run(args)`` is the entry point the experiment uses; it returns the JSON-ready dict.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples` and `laser_fx` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from tqdm import tqdm

import laser_fx
from examples.trm.data import iterate_batches, make_dataset, seq_len, vocab_size
from examples.trm.model import TRM, TRMConfig
from examples.trm.training import EMA, DeepSupervision, evaluate, trm_loss

__all__ = ["ARMS", "build_parser", "main", "run"]

ARMS = ("baseline", "laser")
_SKIP_TIMING = 3  # first steps of each arm left out of the median step time (warm-up)

QUICK = {  # what `make demo` runs: both arms, a few minutes on 2 CPU cores
    "task": "sudoku", "size": 4, "mixer": "mlp_t", "d": 64, "n": 3, "T": 2, "batch": 64,
    "max_sup_steps": 2, "steps": 150, "lr": 3e-3, "seeds": [0], "n_train": 2000, "n_test": 500,
}


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (also the defaults `run` fills in)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--task", choices=("sudoku", "maze"), default="sudoku")
    a("--size", type=int, default=4, help="grid side (sudoku 4/6/9, maze >= 5)")
    a("--difficulty", type=int, default=None, help="sudoku blanks / maze min path (data default)")
    a("--d", type=int, default=64, help="model width D")
    a("--n", type=int, default=3, help="z-updates per cycle")
    a("--T", type=int, default=2, help="cycles per supervision step")
    a("--heads", type=int, default=4)
    a("--mixer", choices=("attn", "mlp_t"), default="mlp_t")
    a("--steps", type=int, default=300, help="optimizer steps per arm")
    a("--max-seconds", type=float, default=0.0,
      help="stop training (both arms) after this many seconds of it (0: run all --steps)")
    a("--batch", type=int, default=64)
    a("--lr", type=float, default=1e-3)
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0: off)")
    a("--warmup", type=int, default=20, help="linear lr warm-up steps")
    a("--schedule", choices=("constant", "cosine"), default="constant",
      help="lr after the warm-up: constant (TRM's) or cosine decay to --min-lr-ratio x lr")
    a("--min-lr-ratio", type=float, default=0.1, help="cosine schedule: final lr / lr")
    a("--ema-decay", type=float, default=0.99, help="EMA of weights (0.999 in TRM's 65k steps)")
    a("--eval-every", type=int, default=0, help="also evaluate every N steps (0: at the end)")
    a("--max-sup-steps", type=int, default=2, help="ACT maximum supervision steps (eval runs all)")
    a("--seeds", type=int, nargs="+", default=[0], help="model / batch-order seeds")
    a("--data-seed", type=int, default=0, help="training puzzles; held-out ones use +10000")
    a("--n-train", type=int, default=2000)
    a("--n-test", type=int, default=500)
    a("--laser", action=argparse.BooleanOptionalAction, default=True,
      help="also train the LASER arm (--no-laser: baseline only)")
    a("--energy", type=float, default=None, help="LaserConfig.energy")
    a("--rank", type=int, default=None, help="LaserConfig.rank (fixed rank)")
    a("--fidelity", type=float, default=None, help="LaserConfig.fidelity")
    a("--mode", choices=("auto", "linear", "region", "checkpoint"), default=None)
    a("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core box)")
    a("--device", default="cpu", help="torch device to train on (cpu, cuda, cuda:1, ...)")
    a("--data-cache", type=Path, default=None,
      help="load the generated puzzles from this file, or generate and save them there")
    a("--save-models", type=Path, default=None,
      help="save each arm's trained weights (and EMA) to DIR/<task><size>_seed<k>_<arm>.pt")
    a("--out", type=Path, default=None, help="write the results JSON here")
    a("--quick", action="store_true", help="the demo: small Sudoku, both arms, ~2-4 min")
    a("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    return p


def _laser_config(args: argparse.Namespace) -> laser_fx.LaserConfig:
    kw = {k: getattr(args, k) for k in ("energy", "rank", "fidelity", "mode")}
    return laser_fx.LaserConfig(**{k: v for k, v in kw.items() if v is not None})


def _lr_at(step: int, args: argparse.Namespace) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up, then the schedule."""
    warmup = max(args.warmup, 1)
    if step + 1 < warmup:
        return args.lr * (step + 1) / warmup
    if args.schedule == "constant":
        return args.lr
    lo = args.min_lr_ratio
    progress = min(1.0, (step + 1 - warmup) / max(args.steps - warmup, 1))
    return args.lr * (lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class _Arm:
    """One trained model: the model (compressed in place for LASER), optimizer, EMA, carry, timings."""

    def __init__(self, name: str, model: TRM, args, seed: int, data):
        self.name, self.model = name, model
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay
        )
        self.ema = EMA(model, args.ema_decay) if args.ema_decay > 0 else None
        batches = iterate_batches(data[0], data[1], args.batch, seed=seed)
        self.ds = DeepSupervision(
            model.initial_carry, batches, max_steps=args.max_sup_steps, seed=seed
        )
        self.times: list[float] = []
        self.losses: list[float] = []
        self.last: dict[str, float] = {}
        self.curve: list[list[float]] = []  # [step, exact, token] on held-out puzzles, raw weights

    def step(self, step: int, args: argparse.Namespace) -> None:
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(step, args)
        _sync(args.device)
        t0 = time.perf_counter()
        inputs, labels, y, z = self.ds.next()
        logits, q, y, z = self.model(inputs, y, z)
        loss, metrics = trm_loss(logits, labels, q)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ds.update(y, z, q)
        if self.ema is not None:
            self.ema.update(self.model)
        _sync(args.device)
        self.times.append(time.perf_counter() - t0)
        self.losses.append(metrics["loss"])
        self.last = metrics


def _sync(device: str) -> None:
    """Wait for queued GPU work, so wall-clock step times are the work's own."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _memory(model: TRM, inputs, labels) -> dict[str, int]:
    y, z = model.initial_carry(inputs.shape[0])
    mem = laser_fx.measure_activation_memory(
        model, (inputs, y, z), lambda out: trm_loss(out[0], labels, out[1])[0]
    )
    model.zero_grad(set_to_none=True)  # the measurement's backward wrote .grad
    return {"activation_bytes": mem.after_forward, "peak_bytes": mem.peak}


def _save_model(arm: _Arm, cfg: TRMConfig, args, seed: int) -> Path:
    """Write the arm's trained weights, EMA weights and model config (loadable on CPU)."""
    path = args.save_models / f"{args.task}{args.size}_seed{seed}_{arm.name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().cpu() for k, v in arm.model.state_dict().items()}
    ema = {k: v.cpu() for k, v in arm.ema.shadow.items()} if arm.ema is not None else None
    torch.save({"config": dataclasses.asdict(cfg), "state_dict": cpu, "ema": ema}, path)
    return path


def _datasets(args: argparse.Namespace):
    """Training and held-out puzzles: generated from the seeds, or read from `--data-cache`."""
    key = {k: getattr(args, k) for k in ("task", "size", "n_train", "n_test", "data_seed",
                                          "difficulty")}
    cache = args.data_cache
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] != key:
            raise SystemExit(
                f"--data-cache {cache} holds puzzles for {saved['key']}, not {key}:"
                " pass another file (or delete it to regenerate)."
            )
        return saved["train"], saved["test"]
    data = make_dataset(args.task, args.size, args.n_train, args.data_seed, difficulty=args.difficulty)
    test = make_dataset(
        args.task, args.size, args.n_test, args.data_seed + 10_000, difficulty=args.difficulty
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "train": data, "test": test}, cache)
    return data, test


def _evaluate(arm: _Arm, test, args) -> dict[str, Any]:
    raw = evaluate(arm.model, test[0], test[1], steps=args.max_sup_steps)
    out: dict[str, Any] = {"raw": raw}
    if arm.ema is not None:
        with arm.ema.apply_to(arm.model):
            out["ema"] = evaluate(arm.model, test[0], test[1], steps=args.max_sup_steps)
    return out


def _train_seed(seed: int, args, data, test, log) -> dict[str, Any]:
    cfg = TRMConfig(
        vocab_size=vocab_size(args.task, args.size), seq_len=seq_len(args.task, args.size),
        hidden_size=args.d, num_heads=args.heads, n=args.n, T=args.T, mixer=args.mixer,
    )
    torch.manual_seed(seed)
    base = TRM(cfg).to(args.device)
    arms = [("baseline", base)]
    probe_x, probe_y = data[0][: args.batch], data[1][: args.batch]
    laser = None
    compress_s = 0.0
    if args.laser:
        laser = copy.deepcopy(base)  # same initial weights: a paired comparison
        y0, z0 = laser.initial_carry(args.batch)
        t0 = time.perf_counter()
        laser_fx.compress(laser, config=_laser_config(args), example_inputs=(probe_x, y0, z0))
        compress_s = time.perf_counter() - t0
        arms.append(("laser", laser))
    start_memory = {name: _memory(model, probe_x, probe_y) for name, model in arms}
    runners = [_Arm(name, model, args, seed, data) for name, model in arms]
    bar = tqdm(range(args.steps), desc=f"seed {seed}", disable=not args.progress, file=sys.stderr)
    t_start = time.perf_counter()
    steps_done = 0
    for step in bar:
        order = runners if step % 2 == 0 else runners[::-1]  # alternate who goes first
        for arm in order:
            arm.step(step, args)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            for arm in runners:
                acc = evaluate(arm.model, test[0], test[1], steps=args.max_sup_steps)
                arm.curve.append([step + 1, acc["exact_acc"], acc["token_acc"]])
        bar.set_postfix({
            f"{a.name[:4]}": f"loss {a.last['loss']:.3f} acc {a.last['token_acc']:.2f}/"
            f"{a.last['exact_acc']:.2f}" for a in runners
        })
        steps_done = step + 1
        if args.max_seconds and time.perf_counter() - t_start > args.max_seconds:
            break
    train_s = time.perf_counter() - t_start
    if args.save_models is not None:
        for arm in runners:
            _save_model(arm, cfg, args, seed)
    # measured again after training: LASER's ranks follow the trained activations' spectra
    memory = {a.name: _memory(a.model, probe_x, probe_y) for a in runners}
    result: dict[str, Any] = {"seed": seed, "train_seconds": train_s, "steps_done": steps_done,
                              "arms": {}}
    for arm in runners:
        times = arm.times[_SKIP_TIMING:] or arm.times
        k = max(len(arm.losses) // 10, 1)
        result["arms"][arm.name] = {
            **memory[arm.name],
            "activation_bytes_at_init": start_memory[arm.name]["activation_bytes"],
            "step_time_median_s": statistics.median(times),
            "loss_first": statistics.fmean(arm.losses[:k]),
            "loss_last": statistics.fmean(arm.losses[-k:]),
            "eval": _evaluate(arm, test, args),
        }
        final = result["arms"][arm.name]["eval"]["raw"]
        result["arms"][arm.name]["curve"] = [*arm.curve,
                                             [steps_done, final["exact_acc"], final["token_acc"]]]
    if laser is not None:
        report = laser_fx.report(laser)  # bytes of the memory measurement's step, on probe_x
        result["laser_report"] = report.to_dict()
        result["compress_seconds"] = compress_s
        log(f"LASER per-site report (seed {seed}):\n{report}\n")
        b, c = result["arms"]["baseline"], result["arms"]["laser"]
        result["memory_ratio"] = c["activation_bytes"] / max(b["activation_bytes"], 1)
        result["step_time_ratio"] = c["step_time_median_s"] / b["step_time_median_s"]
    return result


def run(args: argparse.Namespace | None = None, log=print) -> dict[str, Any]:
    """Train every seed (both arms unless ``args.laser`` is False) and return the results.

    Args:
        args: parsed options (`build_parser`); missing attributes take the parser defaults,
            and ``quick=True`` overrides them with `QUICK`.
        log: where the per-site report and summaries go (``print``; ``lambda s: None`` mutes).

    Returns:
        {"config": options, "eval_weights": ..., "runs": [per-seed results]}: per arm,
        activation and peak bytes of one step on the same batch after training (and the
        activation bytes before it), median step time,
        first/last loss (mean of the first/last tenth of the steps), and held-out exact and
        token accuracy with raw and EMA weights; with LASER also the per-site report and the
        seconds `laser_fx.compress` took.
    """
    defaults = vars(build_parser().parse_args([]))
    opts = {**defaults, **(vars(args) if args is not None else {})}
    if opts["quick"]:
        opts.update(QUICK)
    args = argparse.Namespace(**opts)
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise laser_fx.ConfigError(
            f"--min-lr-ratio must be in [0, 1] (the cosine schedule's final lr as a fraction of"
            f" --lr), got {args.min_lr_ratio}."
        )
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data, test = _datasets(args)
    data_s = time.perf_counter() - t0
    data = tuple(t.to(args.device) for t in data)
    test = tuple(t.to(args.device) for t in test)
    runs = [_train_seed(seed, args, data, test, log) for seed in args.seeds]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in opts.items()}
    return {
        "config": config,
        "eval_weights": "raw weights (primary) and EMA weights, both reported",
        "data_seconds": data_s,
        "torch": torch.__version__,
        "device_name": (torch.cuda.get_device_name(args.device)
                        if torch.device(args.device).type == "cuda" else platform.processor()
                        or platform.machine()),
        "runs": runs,
    }


def _fmt_mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def summarize(result: dict[str, Any]) -> str:
    """A readable summary of `run`'s result (one block per seed)."""
    c = result["config"]
    lines = [
        f"TRM {c['task']} {c['size']}x{c['size']}, mixer {c['mixer']}, D={c['d']}, n={c['n']},"
        f" T={c['T']}, ACT max {c['max_sup_steps']}, batch {c['batch']}, {c['steps']} steps,"
        f" {c['n_test']} held-out puzzles (accuracy: exact / token)",
    ]
    for r in result["runs"]:
        lines.append(f"seed {r['seed']}: {r['steps_done']} steps in {r['train_seconds']:.0f} s")
        lines.append(f"  {'arm':<9} {'act. memory':>12} {'peak':>11} {'step':>8}"
                     f" {'raw exact/token':>16} {'EMA exact/token':>16}")
        for name, a in r["arms"].items():
            ev = a["eval"]
            ema = ev.get("ema")
            lines.append(
                f"  {name:<9} {_fmt_mib(a['activation_bytes']):>12} {_fmt_mib(a['peak_bytes']):>11}"
                f" {a['step_time_median_s'] * 1e3:>6.0f}ms"
                f" {ev['raw']['exact_acc']:>8.1%}/{ev['raw']['token_acc']:.1%}"
                + (f" {ema['exact_acc']:>8.1%}/{ema['token_acc']:.1%}" if ema else "")
            )
        if "memory_ratio" in r:
            lines.append(
                f"  LASER/baseline: activation memory {r['memory_ratio']:.2f}x"
                f" ({1 - r['memory_ratio']:.0%} saved), step time {r['step_time_ratio']:.2f}x"
                " (medians, steps interleaved)"
            )
            lines.append(f"  laser_fx.compress (in place: probe run, swap, one check run):"
                         f" {r['compress_seconds']:.2f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: train, print the summary, write `--out`."""
    args = build_parser().parse_args(argv)
    result = run(args)
    print(summarize(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0 if all(math.isfinite(a["loss_last"]) for r in result["runs"]
                    for a in r["arms"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
