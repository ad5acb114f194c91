"""Depth: peak memory, step time and gradient error against the number of grad-enabled calls.

Backpropagating through more of TRM's recursion (``TRMConfig.grad_cycles``: the last k of T
cycles run with grad, ``k * (n + 1)`` grad-enabled calls of the shared ``net``) is what users
cannot afford with plain autograd. This benchmark measures, at each depth, five configurations
of the same weights in one run with their timed steps interleaved (order alternating per round):

- uncompressed;
- ``torch.utils.checkpoint`` (non-reentrant) per block call (around ``net``) and per layer
  (around each of ``net.blocks.i``);
- laser_fx per block call (``compress(model, config=LaserConfig(granularity="block"))``) and
  per layer (``compress(model, sites=["net.blocks.0", "net.blocks.1"])``).

For each: after-forward and peak activation memory (`laser_fx.measure_activation_memory`), step
time (median of ``--reps`` interleaved steps after a warm-up round, with its IQR), the cosine of
all parameter gradients to the uncompressed ones, and, for laser_fx, what it stored (the ranks
of `laser_fx.report` and the stored / dense bytes of the checkpointed inputs; rank 0 means the
inputs were stored dense, i.e. exactly what torch checkpoint keeps). Then per configuration: the
per-call slope of after-forward memory (least squares over the depths), the largest depth whose
peak fits ``--budget-mib`` (among the measured depths, and from a line fitted to the peaks),
and a plot of peak vs depth.

Default: TRM attention D=128, n=6, ``grad_cycles`` 1, 2, 4, 8, 16 (7 to 112 grad-enabled
calls; T = max(grad_cycles, 3)), random init, batch 8 of generated 7x7 mazes; ``--mixer mlp_t``
(Sudoku 6x6) adds or replaces the model; ``--checkpoint PATH`` loads weights saved by
``examples/trm/train.py --save-models``. 4-7 minutes on 1 thread of a loaded 2-core CPU
(262 s to 422 s measured; ``--mixer mlp_t`` alone: 170 s):

    PYTHONPATH=. python benchmarks/depth.py [--mixer attn mlp_t] [--checkpoint PATH] [--reps 5]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import laser_fx
from laser_fx.wrapper import SiteWrapper

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (  # noqa: E402
    Arm,
    Workload,
    _grads,
    _torch_checkpointed,
    _trm_loss,
    machine,
    measure_arms,
)
from benchmarks.frontier import write_jsonl  # noqa: E402
from benchmarks.scaling import fit_slope  # noqa: E402

__all__ = ["CONFIGS", "GOALS", "build_configs", "laser_storage", "load_trm", "main",
           "max_depth_within", "summarize"]

UNC, TC_CALL, TC_LAYER = "uncompressed", "torch ckpt per call", "torch ckpt per layer"
LX_CALL, LX_LAYER = "laser_fx per call", "laser_fx per layer"
CONFIGS = (UNC, TC_CALL, TC_LAYER, LX_CALL, LX_LAYER)
TORCH, LASER = (TC_CALL, TC_LAYER), (LX_CALL, LX_LAYER)
#: issue 16's must-show at >= 48 grad-enabled calls (laser's best granularity vs torch's best)
GOALS = {"min_calls": 48, "peak": 0.35, "time": 1.05, "cosine": 0.999, "slope": 0.10}
#: stored / dense bytes of the checkpointed inputs above which laser_fx counts as storing dense
DENSE_RATIO = 0.9
MIB = 2.0**20


# --------------------------------------------------------------------------- the model

def _task_of(cfg: Any) -> tuple[str, int] | None:
    """The generated-puzzle task whose vocabulary and length match ``cfg`` (None: none does)."""
    from examples.trm.data import seq_len, vocab_size

    for task, size in [("sudoku", 4), ("sudoku", 6), ("sudoku", 9),
                       *(("maze", s) for s in range(5, 31))]:
        if vocab_size(task, size) == cfg.vocab_size and seq_len(task, size) == cfg.seq_len:
            return task, size
    return None


def load_trm(*, mixer: str, d: int, heads: int | None, n: int | None, T: int, grad_cycles: int,
             checkpoint: str | None = None, seed: int = 0):
    """The TRM example model at one depth: random init, or the weights of ``checkpoint``.

    Args:
        mixer, d, heads: shape of a random-init model (ignored with ``checkpoint``, whose saved
            config decides them); ``heads`` None: 4 below D=128, D/32 from there.
        n: z-updates per cycle (None: 6, or the checkpoint's).
        T, grad_cycles: cycles per step and how many of the last run with grad.
        checkpoint: a file written by ``examples/trm/train.py --save-models``
            (``{"config", "state_dict", "ema"}``).
        seed: weights of a random-init model.

    Returns:
        ``(model, task, size)``: the TRM and the puzzle its inputs are (task None: no
        generated puzzle matches the checkpoint's vocabulary and length).
    """
    from examples.trm.model import TRM, TRMConfig

    if checkpoint is None:
        task, size = ("sudoku", 6) if mixer == "mlp_t" else ("maze", 7)
        from examples.trm.data import seq_len, vocab_size

        cfg = TRMConfig(vocab_size=vocab_size(task, size), seq_len=seq_len(task, size),
                        hidden_size=d, num_heads=heads or (max(1, d // 32) if d >= 128 else 4),
                        n=6 if n is None else n, T=T, grad_cycles=grad_cycles, mixer=mixer)
        torch.manual_seed(seed)
        return TRM(cfg), task, size
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        fields = {f.name for f in dataclasses.fields(TRMConfig)}
        base = {k: v for k, v in saved["config"].items() if k in fields}
        state = saved["state_dict"]
    except (OSError, KeyError, TypeError, RuntimeError) as e:
        raise SystemExit(
            f"--checkpoint {checkpoint}: not a model saved by examples/trm/train.py "
            f"--save-models (a dict with 'config' and 'state_dict'): {e}"
        ) from e
    base.update(T=T, grad_cycles=grad_cycles, **({} if n is None else {"n": n}))
    cfg = TRMConfig(**base)
    model = TRM(cfg)
    model.load_state_dict(state, strict=True)
    task_size = _task_of(cfg)
    return (model, *(task_size or (None, 0)))


def _workload(a: argparse.Namespace, mixer: str, grad_cycles: int) -> tuple[Workload, dict]:
    from examples.trm.data import make_dataset

    model, task, size = load_trm(mixer=mixer, d=a.d, heads=a.heads, n=a.n,
                                 T=max(grad_cycles, a.min_T), grad_cycles=grad_cycles,
                                 checkpoint=a.checkpoint, seed=a.seed)
    cfg = model.config
    if task is not None:
        x, y = make_dataset(task, size, a.batch, a.seed)
        data = f"generated {task} {size}x{size}"
    else:  # a checkpoint of a task the generator does not know: tokens of the right shape
        gen = torch.Generator().manual_seed(a.seed)
        x = torch.randint(0, cfg.vocab_size, (a.batch, cfg.seq_len), generator=gen)
        y = torch.randint(0, cfg.vocab_size, (a.batch, cfg.seq_len), generator=gen)
        data = "random tokens"
    y0, z0 = model.initial_carry(a.batch)
    weights = f"weights {Path(a.checkpoint).name}" if a.checkpoint else "random init"
    name = (f"TRM {cfg.mixer} D={cfg.hidden_size} n={cfg.n}, {weights}, batch {a.batch} of "
            f"{data}")
    w = Workload(name=name, model=model, inputs=(x, y0, z0), kwargs={}, loss_fn=_trm_loss,
                 target=y, shared_path="net")
    return w, {"n": cfg.n, "T": cfg.T, "grad_cycles": grad_cycles,
               "calls": grad_cycles * (cfg.n + 1), "layers": cfg.num_blocks}


def build_configs(w: Workload, layers: Sequence[str],
                  config: laser_fx.LaserConfig | None = None) -> list[Arm]:
    """The five configurations of ``w.model``: the model itself, then changed deep copies.

    Args:
        w: the workload (its shared block is ``w.shared_path``).
        layers: module paths of the block's layers (``net.blocks.0`` ...): the per-layer units.
        config: the laser_fx arms' config (default ``LaserConfig()``; granularity is set per arm).
    """
    config = config or laser_fx.LaserConfig()
    def torch_layers() -> torch.nn.Module:
        m = copy.deepcopy(w.model)
        for path in layers:
            _torch_checkpointed(m, path)
        return m

    def laser(sites: Any, config: laser_fx.LaserConfig | None = None) -> torch.nn.Module:
        return laser_fx.compress(copy.deepcopy(w.model), sites, config=config,
                                 example_inputs=w.inputs)

    return [Arm(UNC, w.model, False),
            Arm(TC_CALL, _torch_checkpointed(copy.deepcopy(w.model), w.shared_path), False),
            Arm(TC_LAYER, torch_layers(), False),
            Arm(LX_CALL, laser("auto", dataclasses.replace(config, granularity="block")), True),
            Arm(LX_LAYER, laser(list(layers), config), True)]


def laser_storage(module: torch.nn.Module) -> dict[str, Any]:
    """What laser_fx stored in ``module``'s last step: ranks, and inputs stored vs dense.

    Returns:
        ``{"sites": [{"site", "rank", "ranks", "inputs_dense_bytes", "inputs_stored_bytes",
        "basis_bytes"}], "inputs_ratio": (coefficients + distinct bases) / dense bytes of the
        inputs routed to a tracker, "basis_ratio": the bases' part of it, "dense": bool,
        "label": one line for the table}``. ``dense`` is true when every site's rank is 0
        (`laser_fx.report`) or the inputs were kept at > `DENSE_RATIO` of their dense size:
        then laser_fx keeps what torch checkpoint keeps.
    """
    stats = {w.site.name: w.stats for w in module.modules() if isinstance(w, SiteWrapper)}
    sites = []
    for row in laser_fx.report(module).to_dict()["sites"]:
        st = stats.get(row["name"])
        sites.append({"site": row["name"], "rank": row["rank"], "ranks": row["ranks"],
                      "inputs_dense_bytes": st.dense_bytes if st else 0,
                      "inputs_stored_bytes": st.stored_bytes if st else 0,
                      "basis_bytes": st.basis_bytes if st else 0})
    dense_b = sum(s["inputs_dense_bytes"] for s in sites)
    basis = sum(s["basis_bytes"] for s in sites) / dense_b if dense_b else 0.0
    ratio = (sum(s["inputs_stored_bytes"] for s in sites) / dense_b + basis if dense_b
             else 1.0)
    dense = all(s["rank"] == 0 for s in sites) or ratio > DENSE_RATIO
    ranks = ", ".join(f"{s['site']}: " + "/".join(map(str, s["ranks"])) for s in sites)
    why = ("rank 0" if all(s["rank"] == 0 for s in sites)
           else f"inputs kept {ratio:.3f}x of dense")
    label = (f"DENSE ({why}) = torch ckpt; ranks {ranks}" if dense
             else f"low-rank, ranks {ranks}; inputs kept {ratio:.3f}x (bases {basis:.3f}x)")
    return {"sites": sites, "inputs_ratio": ratio, "basis_ratio": basis, "dense": dense,
            "label": label}


def _measure_depth(a: argparse.Namespace, mixer: str, grad_cycles: int) -> dict[str, Any]:
    w, shape = _workload(a, mixer, grad_cycles)
    kw = {k: v for k, v in (("energy", a.energy), ("target_cosine", a.target_cosine))
          if v is not None}
    arms = build_configs(w, [f"{w.shared_path}.blocks.{i}" for i in range(shape["layers"])],
                         laser_fx.LaserConfig(**kw))
    rows = measure_arms(w, arms, reps=a.reps, device="cpu", tracker_reps=0)
    for arm, row in zip(arms, rows, strict=True):
        if arm.laser:
            row["storage"] = laser_storage(arm.module)
    # a cosine is only meaningful against a finite reference: record the reference's norm
    # (deep backprop through a random-init recursion can overflow float32)
    ref_norm = float(_grads(w, arms[0]).norm())
    return {"workload": w.name, "mixer": mixer, **shape, "grad_norm": ref_norm, "rows": rows}


# --------------------------------------------------------------------------- analysis

def max_depth_within(budget: float, slope: float, intercept: float, unit: int) -> float:
    """Largest multiple of ``unit`` grad-enabled calls whose fitted peak fits ``budget``.

    Args:
        budget: bytes.
        slope, intercept: the peak fitted as ``intercept + slope * calls``.
        unit: calls per grad cycle (n + 1): depths come in its multiples.

    Returns:
        The depth (0: not even one cycle fits; ``math.inf``: the fitted peak does not grow).
    """
    if intercept + slope * unit > budget:
        return 0
    if slope <= 0:
        return math.inf
    return unit * math.floor((budget - intercept) / slope / unit)


def _best(rows: dict[str, dict], names: Sequence[str]) -> dict[str, Any]:
    return min((rows[k] for k in names), key=lambda r: r["peak_bytes"])


def summarize(points: list[dict[str, Any]], budget: float) -> dict[str, Any]:
    """Slopes, the budget answer and the laser-vs-torch headline of one model's depths.

    Args:
        points: `_measure_depth` records of one model, in increasing depth.
        budget: peak-memory budget in bytes.

    Returns:
        ``{"slopes": {config: after-forward bytes per call}, "peak_fit": {config: (slope,
        intercept) of the peak}, "slope_ratio": {"per call", "per layer", "best"}: laser /
        torch, "budget": {config: {"measured", "fitted"}} (largest depth that fits; 0: none,
        "unbounded": flat fitted peak), "headline": [one dict per depth: laser's best vs
        torch's best granularity]}``.
    """
    calls = [p["calls"] for p in points]
    by = [{r["arm"]: r for r in p["rows"]} for p in points]
    out: dict[str, Any] = {"slopes": {}, "peak_fit": {}, "budget": {}, "headline": []}
    unit = points[0]["n"] + 1
    for cfg in CONFIGS:
        peaks = [b[cfg]["peak_bytes"] for b in by]
        fits = [(c, pk) for c, pk in zip(calls, peaks, strict=True) if pk <= budget]
        fitted = None
        if len(points) >= 2:
            out["slopes"][cfg] = fit_slope(calls, [b[cfg]["after_forward_bytes"] for b in by])[0]
            out["peak_fit"][cfg] = fit_slope(calls, peaks)
            fitted = max_depth_within(budget, *out["peak_fit"][cfg], unit)
            fitted = "unbounded" if fitted == math.inf else int(fitted)  # JSON-able
        out["budget"][cfg] = {"measured": max((c for c, _ in fits), default=0), "fitted": fitted}
    s = out["slopes"]
    out["slope_ratio"] = ({"per call": s[LX_CALL] / s[TC_CALL],
                           "per layer": s[LX_LAYER] / s[TC_LAYER],
                           "best": min(s[k] for k in LASER) / min(s[k] for k in TORCH)}
                          if s else {})
    for p, b in zip(points, by, strict=True):
        tb, lb = _best(b, TORCH), _best(b, LASER)
        h = {"calls": p["calls"], "torch": tb["arm"], "laser": lb["arm"],
             "peak_ratio": lb["peak_bytes"] / tb["peak_bytes"],
             "cosine": lb["grad_cosine"], "grad_norm": p.get("grad_norm"),
             "dense": lb["storage"]["dense"],
             "storage": lb["storage"]["label"]}
        if "step_ms" in lb and "step_ms" in tb:
            h["time_ratio"] = lb["step_ms"] / tb["step_ms"]
        out["headline"].append(h)
    return out


# --------------------------------------------------------------------------- output

def _ms(r: dict[str, Any]) -> str:
    return (f"{r['step_ms']:.0f} [{r['q25_ms']:.0f}-{r['q75_ms']:.0f}]" if "step_ms" in r
            else "-")


def _table(points: list[dict[str, Any]]) -> str:
    lines = ["| grad calls (cycles/T) | configuration | after fwd MiB | peak MiB | peak / "
             "torch best | step ms, median [IQR] | time / torch best | grad cosine | "
             "laser_fx stored |", "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        b = {r["arm"]: r for r in p["rows"]}
        tb = _best(b, TORCH)
        for cfg in CONFIGS:
            r = b[cfg]
            t = (f"{r['step_ms'] / tb['step_ms']:.2f}x" if "step_ms" in r and "step_ms" in tb
                 else "-")
            lines.append(
                f"| {p['calls']} ({p['grad_cycles']}/{p['T']}) | {cfg} | "
                f"{r['after_forward_bytes'] / MIB:.2f} | {r['peak_bytes'] / MIB:.2f} | "
                f"{r['peak_bytes'] / tb['peak_bytes']:.3f}x | {_ms(r)} | {t} | "
                f"{_cos(r['grad_cosine'])} | "
                f"{r['storage']['label'] if 'storage' in r else '-'} |")
    return "\n".join(lines)


def _cos(c: float) -> str:
    return f"{c:.6f}" if math.isfinite(c) else "n/a (non-finite gradient)"


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _summary_text(summary: dict[str, Any], budget: float) -> str:
    lines = []
    if summary["slopes"]:
        unc = summary["slopes"][UNC]
        lines += ["", "Per-call slope of after-forward memory (least squares over the depths):",
                  "", "| configuration | KiB per grad-enabled call | / uncompressed |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v / 1024:.1f} | {v / unc:.4f}x |"
                  for k, v in summary["slopes"].items()]
        sr = summary["slope_ratio"]
        lines += ["", "laser_fx / torch checkpoint slope: "
                  + ", ".join(f"{k} {v:.3f}x" for k, v in sr.items())
                  + f" (goal <= {GOALS['slope']:.2f}x, best vs best: "
                  f"{_mark(sr['best'] <= GOALS['slope'])})"]
    lines += ["", f"Largest depth (grad-enabled calls) whose peak fits {budget / MIB:.0f} MiB: "
              "among the measured depths, and from a line fitted to the peaks (extrapolated "
              "beyond the largest measured depth):", "",
              "| configuration | measured | fitted line |", "|---|---|---|"]
    for k, v in summary["budget"].items():
        f = v["fitted"]
        lines.append(f"| {k} | {v['measured'] or 'none'} | "
                     + ("-" if f is None else f"{f}") + " |")
    lines += ["", "laser_fx at its best granularity vs torch checkpoint at its best (by peak):",
              ""]
    for h in summary["headline"]:
        deep = h["calls"] >= GOALS["min_calls"]
        t = h.get("time_ratio")
        goals = ""
        if deep:
            goals = (f" [goals: peak <= {GOALS['peak']}x {_mark(h['peak_ratio'] <= GOALS['peak'])}"
                     + (f", time <= {GOALS['time']}x {_mark(t <= GOALS['time'])}"
                        if t is not None else "")
                     + f", cosine >= {GOALS['cosine']} "
                     + (_mark(h["cosine"] >= GOALS["cosine"]) if math.isfinite(h["cosine"])
                        else "n/a") + "]")
        lines.append(
            f"- {h['calls']} calls: {h['laser']} / {h['torch']}: peak {h['peak_ratio']:.3f}x, "
            + (f"step time {t:.2f}x, " if t is not None else "")
            + f"gradient cosine {_cos(h['cosine'])} (uncompressed gradient norm "
            f"{h['grad_norm']:.3g}); {h['storage']}{goals}"
            + (" -- laser_fx stored the inputs dense here, so it IS torch checkpoint (no gain "
               "from compression at this energy)" if h["dense"] else ""))
    return "\n".join(lines)


def _markdown(a: argparse.Namespace, models: list[tuple[list[dict], dict | None]]) -> str:
    head = ["# Depth: memory, time and gradient vs grad-enabled calls", "",
            f"machine: {machine()}; `" + " ".join(["PYTHONPATH=. python benchmarks/depth.py",
                                                   *(sys.argv[1:] if a.argv is None
                                                     else a.argv)]) + "`", "",
            "Configurations (same weights, timed steps interleaved per depth): " + ", ".join(
                CONFIGS) + ". Depth = grad-enabled calls of the shared `net` = grad_cycles * "
            "(n + 1); T = max(grad_cycles, --min-T), the first T - grad_cycles cycles without "
            "grad. Inputs: generated puzzles of the model's task (random tokens only for a "
            "checkpoint whose task the generator does not know). Memory: "
            "`laser_fx.measure_activation_memory` (after forward: kept for backward; peak: "
            "over forward + backward). 'torch best' = the torch checkpoint granularity with the "
            "lower peak at that depth. Step time: median of the interleaved steps [IQR] after "
            "one warm-up round, on a machine shared with other jobs (read ratios, not absolute "
            "times). Gradient cosine: all parameter gradients vs uncompressed. laser_fx stored: "
            "ranks of each site's trackers (`laser_fx.report`) and what the compressed inputs "
            "kept (coefficients + distinct bases) / their dense bytes (what torch checkpoint "
            "keeps of them). 'DENSE' marks laser_fx rows whose inputs were stored dense (rank 0 "
            "in laser_fx.report): those equal torch checkpoint."]
    for points, summary in models:
        head += ["", f"## {points[0]['workload']}", "", _table(points)]
        if summary is not None:
            head.append(_summary_text(summary, a.budget_mib * MIB))
    return "\n".join(head) + "\n"


def _plot(models: list[tuple[list[dict], dict | None]], budget: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {UNC: ("k", "s", "-"), TC_CALL: ("C0", "D", "--"), TC_LAYER: ("C0", "o", "-"),
             LX_CALL: ("C3", "^", "--"), LX_LAYER: ("C3", "*", "-")}
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    for (points, _), (ax_p, ax_a) in zip(models, axes, strict=True):
        calls = [p["calls"] for p in points]
        for cfg, (color, marker, ls) in style.items():
            rows = [next(r for r in p["rows"] if r["arm"] == cfg) for p in points]
            for ax, key in ((ax_p, "peak_bytes"), (ax_a, "after_forward_bytes")):
                ax.plot(calls, [r[key] / MIB for r in rows], color=color, marker=marker, ls=ls,
                        label=cfg)
        ax_p.axhline(budget / MIB, color="gray", ls=":", label=f"budget {budget / MIB:.0f} MiB")
        for ax, what in ((ax_p, "peak"), (ax_a, "after forward")):
            ax.set(xlabel="grad-enabled block calls", ylabel=f"{what} memory (MiB)",
                   yscale="log", title=f"{what}: {points[0]['workload']}"[:90])
            ax.title.set_fontsize(8)
            ax.set_xticks(calls)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixer", nargs="+", choices=("attn", "mlp_t"), default=["attn"],
                   help="one model per mixer (random init unless --checkpoint)")
    p.add_argument("--checkpoint", default=None,
                   help="weights saved by examples/trm/train.py --save-models (its config "
                        "decides mixer, D and heads)")
    p.add_argument("--d", type=int, default=128, help="width D (random init)")
    p.add_argument("--heads", type=int, default=None,
                   help="attention heads (default: 4, D/32 from D=128)")
    p.add_argument("--n", type=int, default=None,
                   help="z-updates per cycle (default 6 / the checkpoint's)")
    p.add_argument("--grad-cycles", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                   help="depths: grad-enabled calls = grad_cycles * (n + 1)")
    p.add_argument("--min-T", type=int, default=3, help="T = max(grad_cycles, this)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5, help="timed steps per configuration and depth")
    p.add_argument("--budget-mib", type=float, default=40.0,
                   help="peak-memory budget (default: between torch checkpoint's and laser_fx's "
                        "peak at the largest default depth)")
    p.add_argument("--energy", type=float, default=None,
                   help="laser_fx arms: LaserConfig energy (default: the library's)")
    p.add_argument("--target-cosine", type=float, default=None,
                   help="laser_fx arms: calibrate each slot's energy for this gradient cosine "
                        "at compress (LaserConfig.target_cosine, on the example batch)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/depth.md", help="markdown ('' : none)")
    p.add_argument("--jsonl", default="results/depth.jsonl", help="JSON lines ('' : none)")
    p.add_argument("--plot", default="results/depth_peak.png", help="PNG ('' : none)")
    a = p.parse_args(argv)
    a.argv = None if argv is None else list(argv)
    if a.checkpoint and len(a.mixer) > 1:
        p.error("--checkpoint holds one model: give at most one --mixer with it.")
    if len(set(a.grad_cycles)) != len(a.grad_cycles) or min(a.grad_cycles) < 1:
        p.error(f"--grad-cycles must be distinct values >= 1, got {a.grad_cycles}.")
    a.grad_cycles = sorted(a.grad_cycles)
    return a


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns one record per model (``points``, ``summary``)."""
    a = _parse(argv)
    torch.set_num_threads(a.threads)
    budget = a.budget_mib * MIB
    print(f"machine: {machine()}", flush=True)
    models: list[tuple[list[dict], dict | None]] = []
    first = True
    t0 = time.perf_counter()
    for mixer in a.mixer:
        points: list[dict[str, Any]] = []
        models.append((points, None))
        for g in a.grad_cycles:
            pt = _measure_depth(a, mixer, g)
            points.append(pt)
            write_jsonl(a.jsonl, "depth", {"args": {k: v for k, v in vars(a).items()
                                                   if k != "argv"}, **pt}, fresh=first)
            first = False
            b = {r["arm"]: r for r in pt["rows"]}
            print(f"  [{time.perf_counter() - t0:5.0f} s] {pt['workload']}: {pt['calls']} calls: "
                  + ", ".join(f"{k} peak {b[k]['peak_bytes'] / MIB:.1f} MiB" for k in CONFIGS),
                  flush=True)
            if a.out:  # results as they come, so a long run can be watched
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                Path(a.out).write_text(_markdown(a, models))
        summary = summarize(points, budget)
        models[-1] = (points, summary)
        write_jsonl(a.jsonl, "depth", {"workload": points[0]["workload"], "summary": summary},
                    fresh=False)
        print(f"\n## {points[0]['workload']}\n\n{_table(points)}\n{_summary_text(summary, budget)}",
              flush=True)
    if a.out:
        Path(a.out).write_text(_markdown(a, models))
        print(f"\ntable: {a.out}")
    if a.plot:
        Path(a.plot).parent.mkdir(parents=True, exist_ok=True)
        _plot(models, budget, a.plot)
        print(f"plot: {a.plot}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return [{"points": p, "summary": s} for p, s in models]


if __name__ == "__main__":
    main()
