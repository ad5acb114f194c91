"""Train a Tiny Recursive Model three ways, uncompressed, torch checkpoint and LASER, and compare.

All arms start from the same initial weights and see the same batches; they train in
lockstep (one step of each, the order alternating) so their step times are measured under
the same machine load. The arms:

- ``baseline`` (printed "uncompressed"): the model as written; autograd keeps everything.
- ``checkpoint`` ("torch checkpoint"): a deep copy whose shared block ``net`` runs through
  ``torch.utils.checkpoint`` (non-reentrant) on every grad-enabled call: each call keeps
  its inputs and is re-run in backward (`TorchCheckpoint`).
- ``laser`` ("laser_fx"): a deep copy compressed IN PLACE by ``laser_fx.compress(twin,
  config=LaserConfig(granularity="block"), example_inputs=...)``: it stays a `TRM`
  (``initial_carry``, its state dict keys, train/eval) whose ``net`` is swapped for a wrapper
  that keeps each call's inputs in a tracked low-rank basis (or exactly, where they do not
  compress) and re-runs the call in backward: the same units as the torch checkpoint arm.

With ``--deep-T`` a second, deeper setting is measured after training: the trained
weights in a TRM whose gradient runs through more cycles (``--deep-grad-cycles``), a few
lockstep steps of each arm (memory, peak, step time; not trained to convergence, so no
accuracy). The stored checkpoints grow with every grad-enabled block call there; the re-run
of one call does not.

``--quick`` (what ``make demo`` runs) is 5x5 mazes, attention, D=64, n=3, T=2, 60 steps, then
the same weights with the gradient through all of T=8 cycles; about a minute on 2 CPU cores.
It writes ``results/demo.json``, ``results/demo.md`` and the plot ``results/demo.png``.

Usage::

    python examples/trm/train.py --quick
    python examples/trm/train.py --task maze --size 7 --mixer attn --steps 300 \\
        --grad-cycles 2 --seeds 0 1 --out results/maze.json
    python examples/trm/train.py --arms baseline laser ...   # what experiment.py runs

``run(args)`` is the entry point the experiment uses; it returns the JSON-ready dict.
The printed summary, the results files and the plot are `examples.trm.summary`'s
(`summarize` stays importable from here).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
import torch.utils.checkpoint
from torch import nn
from tqdm import tqdm

import laser_fx
from examples.trm.data import iterate_batches, make_dataset, seq_len, vocab_size
from examples.trm.model import TRM, TRMConfig
from examples.trm.summary import ratios, summarize, write_results
from examples.trm.training import EMA, DeepSupervision, evaluate, trm_loss
from laser_fx.testing import own_code

__all__ = ["ARMS", "QUICK", "TorchCheckpoint", "build_parser", "main", "options", "run",
           "summarize", "torch_checkpointed"]

ARMS = ("baseline", "checkpoint", "laser")
_SKIP_TIMING = 3  # first steps of each arm left out of the median step time (warm-up)
_RESULTS = Path(__file__).resolve().parents[2] / "results"

QUICK = {  # what `make demo` runs: three arms, two depths, about a minute on 2 CPU cores
    "task": "maze", "size": 5, "mixer": "attn", "d": 64, "n": 3, "T": 2, "grad_cycles": 1,
    "batch": 64, "max_sup_steps": 2, "steps": 60, "lr": 1e-3, "grad_clip": 1.0,
    "ema_decay": 0.0, "seeds": [0], "n_train": 2000, "n_test": 500, "arms": list(ARMS),
    "deep_T": 8, "deep_grad_cycles": 8, "deep_steps": 4, "out": _RESULTS / "demo.json",
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
    a("--grad-cycles", type=int, default=1,
      help="backprop through the last k of the T cycles (1: TRM's; T: the whole recursion);"
           " grad-enabled block calls = k * (n + 1)")
    a("--heads", type=int, default=4)
    a("--mixer", choices=("attn", "mlp_t"), default="mlp_t")
    a("--arms", nargs="+", choices=ARMS, default=list(ARMS),
      help="arms to train in lockstep (default: all three)")
    a("--steps", type=int, default=300, help="optimizer steps per arm")
    a("--max-seconds", type=float, default=0.0,
      help="stop training (all arms) after this many seconds of it (0: run all --steps)")
    a("--batch", type=int, default=64)
    a("--lr", type=float, default=1e-3)
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0: off)")
    a("--warmup", type=int, default=20, help="linear lr warm-up steps")
    a("--schedule", choices=("constant", "cosine"), default="constant",
      help="lr after the warm-up: constant (TRM's) or cosine decay to --min-lr-ratio x lr")
    a("--min-lr-ratio", type=float, default=0.1, help="cosine schedule: final lr / lr")
    a("--ema-decay", type=float, default=0.99,
      help="also evaluate an EMA of the weights (in the JSON only; 0.999 in TRM's 65k steps;"
           " 0: off)")
    a("--eval-every", type=int, default=0, help="also evaluate every N steps (0: at the end)")
    a("--max-sup-steps", type=int, default=2, help="ACT maximum supervision steps (eval runs all)")
    a("--seeds", type=int, nargs="+", default=[0], help="model / batch-order seeds")
    a("--data-seed", type=int, default=0, help="training puzzles; held-out ones use +10000")
    a("--n-train", type=int, default=2000)
    a("--n-test", type=int, default=500)
    a("--laser", action=argparse.BooleanOptionalAction, default=True,
      help="--no-laser: the uncompressed arm only (same as --arms baseline)")
    a("--deep-T", type=int, default=0,
      help="after training, also measure the trained weights at this T (0: not)")
    a("--deep-grad-cycles", type=int, default=0,
      help="grad cycles of the deeper setting (0: all --deep-T)")
    a("--deep-n", type=int, default=0, help="n of the deeper setting (0: --n)")
    a("--deep-steps", type=int, default=5,
      help="lockstep steps measured in the deeper setting (the first left out of the timing)")
    a("--energy", type=float, default=None, help="LaserConfig.energy")
    a("--rank", type=int, default=None, help="LaserConfig.rank (fixed rank)")
    a("--fidelity", type=float, default=None, help="LaserConfig.fidelity")
    a("--mode", choices=("auto", "linear", "region", "checkpoint"), default=None)
    a("--target-cosine", type=float, default=None,
      help="LaserConfig.target_cosine: compress calibrates each slot's energy on its example"
           " inputs (the first --batch training puzzles) for this gradient cosine")
    a("--recalibrate-every", type=int, default=None,
      help="LaserConfig.recalibrate_every: with --target-cosine, calibrate again every K steps")
    a("--compile", default=None, metavar="BACKEND",
      help="torch.compile each arm's model for training with this backend (inductor,"
           " aot_eager; default: eager), as TRM's pretrain.py does; laser_fx compiles its"
           " re-run blocks with it too")
    a("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core box)")
    a("--device", default="cpu", help="torch device to train on (cpu, cuda, cuda:1, ...)")
    a("--data-cache", type=Path, default=None,
      help="load the generated puzzles from this file, or generate and save them there")
    a("--save-models", type=Path, default=None,
      help="save each arm's trained weights (and EMA) to DIR/<task><size>_seed<k>_<arm>.pt")
    a("--out", type=Path, default=None,
      help="write the results JSON here, the printed summary beside it (.md) and its plot (.png)")
    a("--quick", action="store_true",
      help="the demo (`make demo`): 5x5 mazes, three arms, a deeper setting, ~1 min")
    a("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    return p


def options(args: argparse.Namespace | None = None) -> argparse.Namespace:
    """The parser defaults, updated by ``args``, then by `QUICK` when ``args.quick``; checked."""
    defaults = vars(build_parser().parse_args([]))
    opts = {**defaults, **(vars(args) if args is not None else {})}
    if opts["quick"]:
        given_out = opts["out"]
        opts.update(QUICK)
        opts["out"] = given_out or QUICK["out"]  # --quick --out PATH writes there instead
    if not opts["laser"]:
        opts["arms"] = ["baseline"]
    unknown = sorted(set(opts["arms"]) - set(ARMS))
    if unknown or not opts["arms"]:
        raise laser_fx.ConfigError(f"--arms must name some of {list(ARMS)}, got {opts['arms']}.")
    opts["arms"] = [a for a in ARMS if a in opts["arms"]]  # a fixed order: rows, ratios
    if not 0.0 <= opts["min_lr_ratio"] <= 1.0:
        raise laser_fx.ConfigError(
            f"--min-lr-ratio must be in [0, 1] (the cosine schedule's final lr as a fraction of"
            f" --lr), got {opts['min_lr_ratio']}."
        )
    if opts["deep_T"] < 0 or opts["deep_grad_cycles"] < 0 or opts["deep_n"] < 0:
        raise laser_fx.ConfigError("--deep-T, --deep-grad-cycles and --deep-n must be >= 0.")
    return argparse.Namespace(**opts)


def _laser_config(args: argparse.Namespace) -> laser_fx.LaserConfig:
    kw = {k: getattr(args, k) for k in ("energy", "rank", "fidelity", "mode", "target_cosine",
                                         "recalibrate_every")}
    compiled = getattr(args, "compile", None)
    if compiled:
        kw["compile_backend"] = compiled
    # per block call, like the torch checkpoint arm: not split into layers ("auto" would)
    return laser_fx.LaserConfig(granularity="block",
                                **{k: v for k, v in kw.items() if v is not None})


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


# --------------------------------------------------------------------------------- arms
class TorchCheckpoint(nn.Module):
    """Runs the wrapped module through ``torch.utils.checkpoint`` (non-reentrant) with grad on.

    Each grad-enabled call keeps only its inputs and re-runs the module in backward; without
    grad (TRM's first cycles, evaluation) it calls the module directly. The wrapper hides its
    ``module.`` prefix from ``state_dict`` and ``load_state_dict`` (as torch's
    ``CheckpointWrapper`` does), so the arm's weights save and load as the plain model's.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.register_state_dict_post_hook(self._drop_prefix)
        self.register_load_state_dict_pre_hook(self._add_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(self.module, *args, use_reentrant=False,
                                                 **kwargs)

    @staticmethod
    def _drop_prefix(module: nn.Module, state_dict: dict, prefix: str, _meta: Any) -> None:
        inner = prefix + "module."
        for key in [k for k in state_dict if k.startswith(inner)]:
            state_dict[prefix + key[len(inner):]] = state_dict.pop(key)

    @staticmethod
    def _add_prefix(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
        inner = prefix + "module."
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
            state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


def torch_checkpointed(model: TRM) -> TRM:
    """``model`` with its shared ``net`` wrapped IN PLACE in a `TorchCheckpoint`; returns it."""
    model.net = TorchCheckpoint(model.net)
    return model


def _build_arms(base: TRM, args, probe_x) -> tuple[dict[str, TRM], float]:
    """The selected arms' models, all from ``base``'s weights; and compress's seconds."""
    models: dict[str, TRM] = {}
    compress_s = 0.0
    for name in args.arms:
        if name == "baseline":
            models[name] = base
        elif name == "checkpoint":
            models[name] = torch_checkpointed(copy.deepcopy(base))
        else:
            twin = copy.deepcopy(base)  # same initial weights: a paired comparison
            y0, z0 = twin.initial_carry(probe_x.shape[0])
            t0 = time.perf_counter()
            laser_fx.compress(twin, config=_laser_config(args), example_inputs=(probe_x, y0, z0))
            compress_s = time.perf_counter() - t0
            models[name] = twin
    return models, compress_s


class _Arm:
    """One trained model: the model, optimizer, EMA, carry, timings."""

    def __init__(self, name: str, model: TRM, args, seed: int, data, ema: bool = True):
        self.name, self.model = name, model
        backend = getattr(args, "compile", None)
        # the training forward, compiled as the reference pretrain.py does (eval stays eager);
        # each arm's classes get their own code objects (own_code): a region-mode arm's graph
        # breaks in the recursion loop would make dynamo run every arm's loop eagerly
        self.forward = torch.compile(own_code(model), backend=backend) if backend else model
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay
        )
        self.ema = EMA(model, args.ema_decay) if ema and args.ema_decay > 0 else None
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
        logits, q, y, z = self.forward(inputs, y, z)
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

    def median_step(self, skip: int = _SKIP_TIMING) -> float:
        """Median step time, the first ``skip`` steps (at most half) left out as warm-up."""
        return statistics.median(self.times[min(skip, len(self.times) // 2):])


def _lockstep(runners: list[_Arm], steps: int, args, desc: str, on_step=None) -> int:
    """Train ``runners`` one step each per round (first arm alternating); returns steps done."""
    bar = tqdm(range(steps), desc=desc, disable=not args.progress, file=sys.stderr)
    t_start = time.perf_counter()
    done = 0
    for step in bar:
        for arm in runners if step % 2 == 0 else runners[::-1]:
            arm.step(step, args)
        if on_step is not None:
            on_step(step)
        bar.set_postfix({
            f"{a.name[:4]}": f"loss {a.last['loss']:.3f} acc {a.last['token_acc']:.2f}/"
            f"{a.last['exact_acc']:.2f}" for a in runners
        })
        done = step + 1
        if args.max_seconds and time.perf_counter() - t_start > args.max_seconds:
            break
    return done


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


def _grad_calls(cfg: TRMConfig) -> int:
    return cfg.grad_cycles * (cfg.n + 1)


def _setting(cfg: TRMConfig) -> dict[str, int]:
    return {"n": cfg.n, "T": cfg.T, "grad_cycles": cfg.grad_cycles,
            "grad_calls": _grad_calls(cfg)}


def _stored_ranks(model: nn.Module) -> dict[str, dict[str, list[int]]]:
    """Per LASER site and stored input slot: [width, rank] of its tracker (0: stored exactly)."""
    return {m.site.name: {slot: [t.width, int(t.stats()["rank"])] for slot, t in m.trackers.items()}
            for m in model.modules() if isinstance(m, laser_fx.SiteWrapper)}


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


def _deeper(trained: TRM, args, seed: int, data, probe, log) -> dict[str, Any]:
    """The trained weights in a deeper-gradient TRM: a few lockstep steps of every arm."""
    cfg = dataclasses.replace(
        trained.config, T=args.deep_T, n=args.deep_n or trained.config.n,
        grad_cycles=args.deep_grad_cycles or args.deep_T,
    )
    base = TRM(cfg).to(args.device)
    base.load_state_dict(trained.state_dict())  # the same weights; only the recursion differs
    models, compress_s = _build_arms(base, args, probe[0])
    runners = [_Arm(name, model, args, seed, data, ema=False) for name, model in models.items()]
    desc = f"seed {seed}, deeper ({_grad_calls(cfg)} grad calls)"
    _lockstep(runners, args.deep_steps, args, desc)
    out: dict[str, Any] = {"setting": _setting(cfg), "steps": args.deep_steps, "arms": {}}
    for arm in runners:
        out["arms"][arm.name] = {**_memory(arm.model, *probe),
                                 "step_time_median_s": arm.median_step(skip=1)}
    if "laser" in models:
        report = laser_fx.report(models["laser"])
        out["laser_report"] = report.to_dict()
        out["laser_ranks"] = _stored_ranks(models["laser"])
        out["compress_seconds"] = compress_s
        log(f"LASER per-site report (seed {seed}, deeper setting):\n{report}\n")
    out["vs_checkpoint"] = ratios(out["arms"], "laser", "checkpoint")
    return out


def _train_seed(seed: int, args, data, test, log) -> dict[str, Any]:
    cfg = TRMConfig(
        vocab_size=vocab_size(args.task, args.size), seq_len=seq_len(args.task, args.size),
        hidden_size=args.d, num_heads=args.heads, n=args.n, T=args.T,
        grad_cycles=args.grad_cycles, mixer=args.mixer,
    )
    torch.manual_seed(seed)
    base = TRM(cfg).to(args.device)
    probe = (data[0][: args.batch], data[1][: args.batch])
    models, compress_s = _build_arms(base, args, probe[0])
    start_memory = {name: _memory(model, *probe) for name, model in models.items()}
    runners = [_Arm(name, model, args, seed, data) for name, model in models.items()]

    def on_step(step: int) -> None:
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            for arm in runners:
                acc = evaluate(arm.model, test[0], test[1], steps=args.max_sup_steps)
                arm.curve.append([step + 1, acc["exact_acc"], acc["token_acc"]])

    t_start = time.perf_counter()
    steps_done = _lockstep(runners, args.steps, args, f"seed {seed}", on_step)
    train_s = time.perf_counter() - t_start
    if args.save_models is not None:
        for arm in runners:
            _save_model(arm, cfg, args, seed)
    # measured again after training: LASER's ranks follow the trained activations' spectra
    memory = {a.name: _memory(a.model, *probe) for a in runners}
    result: dict[str, Any] = {"seed": seed, "train_seconds": train_s, "steps_done": steps_done,
                              "setting": _setting(cfg), "arms": {}}
    for arm in runners:
        k = max(len(arm.losses) // 10, 1)
        result["arms"][arm.name] = {
            **memory[arm.name],
            "activation_bytes_at_init": start_memory[arm.name]["activation_bytes"],
            "step_time_median_s": arm.median_step(),
            "loss_first": statistics.fmean(arm.losses[:k]),
            "loss_last": statistics.fmean(arm.losses[-k:]),
            "losses": arm.losses,
            "eval": _evaluate(arm, test, args),
        }
        final = result["arms"][arm.name]["eval"]["raw"]
        result["arms"][arm.name]["curve"] = [*arm.curve,
                                             [steps_done, final["exact_acc"], final["token_acc"]]]
    if "laser" in models:
        report = laser_fx.report(models["laser"])  # bytes of the memory measurement's step
        result["laser_report"] = report.to_dict()
        result["laser_ranks"] = _stored_ranks(models["laser"])
        result["compress_seconds"] = compress_s
        log(f"LASER per-site report (seed {seed}):\n{report}\n")
    arms = result["arms"]
    if "laser" in arms and "baseline" in arms:  # the experiment's figures (laser / baseline)
        result["memory_ratio"] = (arms["laser"]["activation_bytes"]
                                  / max(arms["baseline"]["activation_bytes"], 1))
        result["step_time_ratio"] = (arms["laser"]["step_time_median_s"]
                                     / arms["baseline"]["step_time_median_s"])
    result["vs_checkpoint"] = ratios(arms, "laser", "checkpoint")
    if args.deep_T:
        # the uncompressed weights: every arm's state dict has the plain model's keys
        trained = next(iter(models.values()))
        plain = TRM(cfg).to(args.device)
        plain.load_state_dict(trained.state_dict())
        result["deeper"] = _deeper(plain, args, seed, data, probe, log)
    return result


def run(args: argparse.Namespace | None = None, log=print) -> dict[str, Any]:
    """Train every seed (the arms in ``args.arms``) and return the results.

    Args:
        args: parsed options (`build_parser`); missing attributes take the parser defaults,
            and ``quick=True`` overrides them with `QUICK` (see `options`).
        log: where the per-site reports go (``print``; ``lambda s: None`` mutes).

    Returns:
        {"config": options, "eval_weights": ..., "runs": [per-seed results]}: per arm,
        activation and peak bytes of one step on the same batch after training (and the
        activation bytes before it), median step time, the loss of every step and
        first/last loss (mean of the first/last tenth of the steps), held-out exact and
        token accuracy with raw (and, with ``ema_decay > 0``, EMA) weights; with LASER also
        the per-site report and the seconds `laser_fx.compress` took; with ``deep_T`` the
        same memory, time and report in the deeper setting (``"deeper"``).
    """
    args = options(args)
    torch.set_num_threads(args.threads)
    t_run = t0 = time.perf_counter()
    data, test = _datasets(args)
    data_s = time.perf_counter() - t0
    data = tuple(t.to(args.device) for t in data)
    test = tuple(t.to(args.device) for t in test)
    runs = [_train_seed(seed, args, data, test, log) for seed in args.seeds]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {
        "config": config,
        "eval_weights": ("raw weights (primary)"
                         + (" and EMA weights" if args.ema_decay > 0 else "")),
        "data_seconds": data_s,
        "torch": torch.__version__,
        "device_name": (torch.cuda.get_device_name(args.device)
                        if torch.device(args.device).type == "cuda" else platform.processor()
                        or platform.machine()),
        "runs": runs,
        "run_seconds": time.perf_counter() - t_run,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry: train, print the summary, write `--out` (and its .md and .png)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    result = run(args)
    text = summarize(result)
    print(text)
    out = result["config"]["out"]
    if out is not None:
        written = write_results(result, text, Path(out), argv)
        print("wrote " + ", ".join(map(str, written)))
    return 0 if all(math.isfinite(a["loss_last"]) for r in result["runs"]
                    for a in r["arms"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
