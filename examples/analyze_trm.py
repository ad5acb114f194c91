"""Activation-manifold analysis of trained and randomly initialised TRMs (issue #7).

For the TRM experiment's two tasks (6x6 Sudoku with `mlp_t`, 7x7 mazes with attention; the
presets of ``examples/trm/experiment.py``, seed 0, baseline arm) and for the same models at
random init, runs ``laser_fx.analysis.analyze`` on one training batch and writes
``results/analysis.md``, ``results/analysis_*.png`` and ``results/analysis.json``.
Checkpoints are trained when missing (``examples/trm/train.py --no-laser --save-models``:
~1.5 min for Sudoku, ~4-6 min for the maze on a 2-core CPU); the analysis itself takes
about a minute.

Usage (from the repository root)::

    PYTHONPATH=. .venv/bin/python examples/analyze_trm.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples` and `laser_fx` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from examples.trm.data import make_dataset
from examples.trm.experiment import TASKS
from examples.trm.model import TRM, TRMConfig
from laser_fx.analysis import Analysis, analyze, plot_analysis, write_markdown

__all__ = ["build_parser", "load_or_train", "main", "train_command"]

_ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt-dir", type=Path, default=Path("checkpoints"),
                   help="where the trained TRM checkpoints are (trained here when missing)")
    p.add_argument("--out-dir", type=Path, default=Path("results"))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--batch", type=int, default=64, help="training puzzles in the analysed batch")
    p.add_argument("--seed", type=int, default=0, help="model seed (as in the experiment)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def train_command(task: str, ckpt_dir: Path, seed: int) -> list[str]:
    """The `train.py` command that writes the baseline checkpoint of ``task``'s preset."""
    spec = TASKS[task]
    cmd = [sys.executable, "examples/trm/train.py"]
    for key, val in spec.items():
        cmd += [f"--{key.replace('_', '-')}", str(val)]
    return cmd + ["--seeds", str(seed), "--no-laser", "--save-models", str(ckpt_dir),
                  "--no-progress"]


def load_or_train(task: str, ckpt_dir: Path, seed: int, log=print) -> tuple[TRM, Path]:
    """The trained baseline TRM of ``task`` (training it first when its file is missing)."""
    spec = TASKS[task]
    path = ckpt_dir / f"{spec['task']}{spec['size']}_seed{seed}_baseline.pt"
    if not path.exists():
        cmd = train_command(task, ckpt_dir, seed)
        log(f"training missing checkpoint {path}: {shlex.join(cmd)}")
        env = {"PYTHONPATH": str(_ROOT), "PATH": "/usr/bin:/bin"}
        subprocess.run(cmd, cwd=_ROOT, env=env, check=True)
    saved = torch.load(path, weights_only=True)
    model = TRM(TRMConfig(**saved["config"]))
    model.load_state_dict(saved["state_dict"])  # raw weights: the ones training runs forward
    return model, path


def _inputs(model: TRM, task: str, batch: int) -> tuple[torch.Tensor, ...]:
    spec = TASKS[task]
    tokens, _ = make_dataset(spec["task"], spec["size"], batch, seed=0)  # the training puzzles
    y, z = model.initial_carry(tokens.shape[0])  # a first supervision step's carry
    return tokens, y, z


def _machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                   if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__},"
            f" {torch.get_num_threads()} torch thread(s), Python {platform.python_version()}")


def _summary(analyses: list[Analysis]) -> list[str]:
    """One row per model: the three claims' numbers and the default config's saving."""
    lines = ["## Summary", "",
             "| model | (a) median erank99/width | (a) median erank90/width | (b) median 1-iter gap"
             " | (b) extra resets (default tracker) | (c) spread max/min | `net` bytes saved |",
             "|---|---|---|---|---|---|---|"]
    for an in analyses:
        c = an.claims()
        net = an.memory.get("net", {}).get("saved")
        lines.append(
            f"| {an.model} | {c['a']['median_erank99_frac']:.0%} ({_yes(c['a']['holds'])}) |"
            f" {c['a']['median_erank90_frac']:.0%} | {c['b']['median_gap_1']:.1e}"
            f" ({_yes(c['b']['holds'])}) | {c['b']['extra_resets']} |"
            f" {c['c']['spread']:.1f}x ({_yes(c['c']['holds'])}) |"
            f" {'-' if net is None else f'{net:.0%}'} |")
    return [*lines, "", _READING, ""]


def _yes(holds: bool | None) -> str:
    return {True: "holds", False: "fails", None: "n/a"}[holds]


_READING = (
    "Reading of the committed run (seed 0, written by hand: the tables are regenerated by the"
    " command above, this paragraph is not). (a) is task-dependent here: the maze models (few token types, RoPE, no learned"
    " positions) sit in a few percent of their width, the 6x6 Sudoku models need 53-93% of it"
    " for 99% of the energy (90% of it fits in ~20% after training, 40% at random init)."
    " Training concentrates Sudoku (median 87% -> 74%) and spreads the maze out of its"
    " degenerate start (3% -> 14%). At random init"
    " the maze inputs are low-rank largely because the carry starts constant and a 7x7 maze"
    " has a handful of token values, so rows repeat: a property of the data, not of learning."
    " (b) holds in energy terms everywhere: one warm-started power iteration keeps the"
    " optimal rank-k energy to within ~1e-3, although the trailing directions of the"
    " 99%-energy subspace (near-equal singular values) are not pinned down (largest-angle"
    " sine near 1 on Sudoku); the default tracker resets beyond its first calls 2 (Sudoku) to 7"
    " (maze) times in 30 tracked steps, since a power update may grow the rank into its"
    " oversampled columns (18 resets on the trained maze before it could)."
    " (c) the spread across sites is 1.5-1.8x on Sudoku (not sharp) and ~3.3x on the maze;"
    " these small models have only 10 site slots each (two block inputs, eight linear inputs).")


def _header(args: argparse.Namespace, trained: dict[str, str], seconds: float) -> str:
    cmd = "PYTHONPATH=. .venv/bin/python examples/analyze_trm.py " + shlex.join(sys.argv[1:])
    lines = [
        "# Activation-manifold analysis of TRM (issue #7)", "",
        f"Reproduce: `{cmd.strip()}` ({seconds:.0f} s here; trains missing checkpoints first).",
        f"Machine: {_machine()}.", "",
        "Checkpoints (baseline arm, raw weights, trained without LASER):", "",
    ]
    for task, cmd_line in trained.items():
        lines.append(f"- {task}: `{cmd_line}`")
    lines += [
        "",
        "What is measured. One training-mode forward (`model.train()`, grad enabled) on"
        f" {args.batch} training puzzles with the initial carry, as in the first supervision"
        " step. For every site `laser_fx.find_sites` reports, each grad-enabled use's stored"
        " activation is a (tokens, width) matrix: the shared block `net` -> its two inputs"
        " per call (`net[0]` = h, `net[1]` = the injection; what the compressed checkpoint"
        " of the default config stores), each shared module nested in it (found by the same"
        " probe run) -> its inputs, each shared linear -> its input (what `mode=\"linear\"`"
        " stores). TRM runs its first T-1 cycles under `torch.no_grad()`: those calls store"
        " nothing for backward and are NOT recorded (here T=2, n=3: 4 of 8 calls of `net`"
        " are recorded). SVDs in float64. erank90/erank99 = smallest k keeping 90%/99% of the"
        " squared Frobenius norm; PR = participation ratio (sum s^2)^2 / sum s^4; E(k) = energy"
        " of the best rank-k subspace; drift = largest principal angle between consecutive"
        " recorded uses' top-k subspaces at k = the listed k at or above erank99; 1-/2-iter gap"
        " = largest over steps of the energy fraction lost by 1/2 warm-started block power"
        " iterations (from the previous step's basis, rank = first use's erank99, no"
        " oversampling, no resets) against the exact top-k; resets = what a fresh"
        " `SubspaceTracker(LaserConfig())` does on the same 4 recorded uses (the first call is"
        " always a reset). q/k/v (and gate/up) read the same input, so they show identical rows.",
        "",
        "Caveat: one forward has only 4 grad-enabled steps per site; tracking across training"
        " steps (the basis carried from one optimizer step to the next) is not measured here.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Train missing checkpoints, analyse every model, write the report, plots and JSON."""
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models: list[tuple[str, TRM, tuple]] = []
    trained: dict[str, str] = {}
    for task in args.tasks:
        model, path = load_or_train(task, args.ckpt_dir, args.seed)
        cfg = model.config
        models.append((f"{task}_trained", model, _inputs(model, task, args.batch)))
        trained[task] = "PYTHONPATH=. .venv/bin/python " + shlex.join(
            train_command(task, args.ckpt_dir, args.seed)[1:])
        torch.manual_seed(args.seed)  # the same initialisation train.py starts from
        models.append((f"{task}_random_init", TRM(cfg), _inputs(model, task, args.batch)))
    analyses: list[Analysis] = []
    images: dict[str, list[str]] = {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for label, model, inputs in tqdm(models, desc="analyse", disable=not args.progress):
        an = analyze(model, inputs, label=label, linear_memory=True)
        analyses.append(an)
        pngs = plot_analysis(an, args.out_dir, f"analysis_{label}")
        images[label] = [p.name for p in pngs]
        json_path = args.out_dir / "analysis.json"  # rewritten as models finish
        json_path.write_text(json.dumps({"analyses": [a.to_dict() for a in analyses]}))
    header = "\n".join([_header(args, trained, time.perf_counter() - t0), "",
                        *_summary(analyses)])
    md = write_markdown(analyses, args.out_dir / "analysis.md", header=header, images=images)
    for an in analyses:
        c = an.claims()
        print(f"{an.model}: (a) {c['a']['holds']} (b) {c['b']['holds']} (c) {c['c']['holds']}")
    print(f"wrote {md}, {args.out_dir / 'analysis.json'} and {sum(map(len, images.values()))} PNGs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
