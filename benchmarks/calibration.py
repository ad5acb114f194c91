"""Calibrated gradient error vs one global energy, on TRMs as they train.

For each task (6x6 Sudoku with the `mlp_t` TRM, 7x7 mazes with the attention TRM) and width
D, an uncompressed TRM trains (AdamW, one supervision step per batch). At a few points of
training, on the weights of that moment:

* calibrated: a deep copy is compressed with the default config and `laser_fx.calibrate`d on
  a training micro-batch with the TRM loss for ``--target`` (per-slot energies);
* single energy: for each energy of the ladder, lowest first, a deep copy compressed with
  that energy alone; the smallest one whose gradient meets the target on every held-out
  batch is the one a user would have to pick.

Both are measured on the same held-out batches: gradient cosine to the exact (uncompressed)
gradient of the TRM loss, and the bytes the compressed calls keep (`laser_fx.report`).

    PYTHONPATH=. python benchmarks/calibration.py            # ~10 min on 2 CPU cores
    PYTHONPATH=. python benchmarks/calibration.py --quick    # seconds (tests)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import laser_fx
from examples.trm.data import iterate_batches, make_dataset, seq_len, vocab_size
from examples.trm.model import TRM, TRMConfig
from examples.trm.training import trm_loss
from laser_fx.calibration import DEFAULT_ENERGIES
from laser_fx.report import compressed_sites

TASKS = {
    "sudoku": {"task": "sudoku", "size": 6, "mixer": "mlp_t", "lr": 2e-3},
    "maze": {"task": "maze", "size": 7, "mixer": "attn", "lr": 1e-3},
}


def _model(task: dict[str, Any], d: int, seed: int) -> TRM:
    cfg = TRMConfig(vocab_size=vocab_size(task["task"], task["size"]),
                    seq_len=seq_len(task["task"], task["size"]), hidden_size=d,
                    num_heads=max(1, d // 32), n=3, T=2, mixer=task["mixer"])
    torch.manual_seed(seed)
    return TRM(cfg)


def _loss(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    y, z = model.initial_carry(tokens.shape[0])
    logits, q_halt, _, _ = model(tokens, y, z)
    return trm_loss(logits, labels, q_halt)[0]


def _grad(model: torch.nn.Module, batch) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    grads = torch.autograd.grad(_loss(model, *batch), params, allow_unused=True)
    return torch.cat([torch.zeros(p.numel()) if g is None else g.flatten()
                      for p, g in zip(params, grads, strict=True)])


def _measure(model: torch.nn.Module, base: torch.nn.Module, held_out,
             fresh: bool = False) -> dict[str, float]:
    """Min gradient cosine to ``base``'s exact gradient over the held-out batches, and the
    mean bytes ``model``'s compressed calls keep per batch (``fresh``: trackers reset before
    each batch, as `laser_fx.calibrate` measures)."""
    cos, kept = [], []
    for batch in held_out:
        if fresh:
            for site in compressed_sites(model):
                site.reset()
        cos.append(F.cosine_similarity(_grad(model, batch), _grad(base, batch), dim=0).item())
        kept.append(laser_fx.report(model).totals()["stored_bytes"])
    return {"cosine": min(cos), "stored_bytes": sum(kept) / len(kept)}


def _compressed(base: torch.nn.Module, example, **config: Any) -> torch.nn.Module:
    model = copy.deepcopy(base)
    y, z = model.initial_carry(example[0].shape[0])
    laser_fx.compress(model, example_inputs=(example[0], y, z),
                      config=laser_fx.LaserConfig(**config))
    return model


def point(base: torch.nn.Module, micro, held_out, target: float,
          calibrate_for: float | None = None, fresh: bool = False) -> dict[str, Any]:
    """Calibrated vs the smallest single energy meeting ``target``, at ``base``'s weights;
    ``calibrate_for``: a stricter cosine to calibrate for (a safety margin), default ``target``."""
    cal = _compressed(base, micro)
    y, z = cal.initial_carry(micro[0].shape[0])
    t0 = time.perf_counter()
    result = laser_fx.calibrate(cal, (micro[0], y, z), target_cosine=calibrate_for or target,
                                loss_fn=lambda out: trm_loss(out[0], micro[1], out[1])[0])
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {
        "energies": {s.name: s.energies for s in result.sites},
        "calibration_cosine": result.cosine, "calibration_seconds": seconds,
        "calibrated": _measure(cal, base, held_out, fresh),
    }
    for e in DEFAULT_ENERGIES:
        m = _compressed(base, micro, energy=e)
        got = _measure(m, base, held_out, fresh)
        if got["cosine"] >= target or e == DEFAULT_ENERGIES[-1]:
            row["single"] = {"energy": e, **got}
            break
    return row


def run(args: argparse.Namespace, log=print) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.tasks:
        task = TASKS[name]
        for d in args.d:
            base = _model(task, d, args.seed)
            inputs, labels = make_dataset(task["task"], task["size"], args.n_train, args.seed)
            test_x, test_y = make_dataset(task["task"], task["size"], args.n_test, args.seed + 1)
            batches = iterate_batches(inputs, labels, args.batch, args.seed)
            held_out = list(itertools.islice(iterate_batches(test_x, test_y, args.batch, 0),
                                             args.held_out))
            opt = torch.optim.AdamW(base.parameters(), lr=task["lr"], betas=(0.9, 0.95))
            for step in range(args.steps + 1):
                if step in args.points:
                    micro = next(batches)
                    micro = (micro[0][: args.micro], micro[1][: args.micro])
                    row = {"task": name, "d": d, "step": step, "target": args.target,
                           "calibrated_for": args.calibrate_for or args.target,
                           "fresh_trackers": args.fresh_trackers,
                           **point(base, micro, held_out, args.target, args.calibrate_for,
                                   args.fresh_trackers)}
                    rows.append(row)
                    log(_fmt(row))
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
                if step == args.steps:
                    break
                tokens, target_labels = next(batches)
                loss = _loss(base, tokens, target_labels)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
    return rows


def _fmt(row: dict[str, Any]) -> str:
    c, s = row["calibrated"], row["single"]
    return (f"{row['task']} D={row['d']} step {row['step']}: calibrated {row['energies']} "
            f"cos {c['cosine']:.5f} {c['stored_bytes'] / 2**10:.0f} KiB | smallest single energy "
            f"{s['energy']} cos {s['cosine']:.5f} {s['stored_bytes'] / 2**10:.0f} KiB | bytes "
            f"calibrated/single {c['stored_bytes'] / max(s['stored_bytes'], 1):.2f}x")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["sudoku", "maze"])
    p.add_argument("--d", type=int, nargs="+", default=[64, 128])
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--points", type=int, nargs="+", default=[0, 100, 300],
                   help="training steps at which to compare")
    p.add_argument("--target", type=float, default=0.9995, help="gradient cosine to meet")
    p.add_argument("--calibrate-for", type=float, default=None,
                   help="cosine to calibrate for (a margin above --target); default --target")
    p.add_argument("--fresh-trackers", action="store_true",
                   help="reset the trackers before each held-out batch (as calibrate measures)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--micro", type=int, default=8, help="calibration micro-batch")
    p.add_argument("--held-out", type=int, default=3, help="held-out batches per point")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/calibration.jsonl", help="JSON lines ('': none)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    args = p.parse_args(argv)
    if args.quick:
        args.d, args.steps, args.points, args.batch, args.micro = [16], 2, [0, 2], 8, 4
        args.held_out, args.n_train, args.n_test = 1, 64, 16
    print(f"machine: {torch.__version__}, {args.threads} thread(s); target cosine {args.target}")
    return run(args)


if __name__ == "__main__":
    main()
