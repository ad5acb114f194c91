"""Shared measurement helpers of the benchmarks: workloads, arms, interleaved timing, memory,
gradient cosine and the share of step time spent in tracker work.

A *workload* is a model, its inputs (positional and keyword) and a loss; an *arm* is one way
of training it (uncompressed, exact `torch.utils.checkpoint` around every recursion step, or a
LASER mode). Every arm but the uncompressed one is a deep copy of the workload's model (same
weights), changed in place: the shared block wrapped in a torch checkpoint, or the copy
compressed by `laser_fx.compress`. Every arm of a workload is measured in the same process,
its timed steps interleaved with the other arms' (order alternating per round), so machine
load hits them alike.
"""

from __future__ import annotations

import copy
import platform
import statistics
import subprocess
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import laser_fx

from ._tracker_probe import TrackerProbe

__all__ = [
    "Arm",
    "TorchCheckpoint",
    "Workload",
    "albert_workload",
    "build_arms",
    "host_syncs",
    "machine",
    "measure_arms",
    "sync_row",
    "sync_sources",
    "sync",
    "trm_workload",
]

#: LASER arms: label -> LaserConfig mode. "auto" (the default) is the compressed checkpoint of
#: every shared-block call, i.e. LASER combined with checkpointing (only compressed inputs kept).
LASER_MODES = {"LASER linear": "linear", "LASER region": "region",
               "LASER auto (default) = LASER + checkpointing": "auto"}


@dataclass
class Workload:
    """A model to benchmark.

    Attributes:
        name: label in tables.
        model: the uncompressed model (its gradients are the reference).
        inputs: positional inputs of the model (also `laser_fx.compress`'s ``example_inputs``).
        kwargs: keyword inputs (ALBERT's ``input_ids`` / ``attention_mask``; also
            ``example_kwargs``).
        loss_fn: ``(output, target) -> scalar loss``.
        target: the loss's target tensor.
        shared_path: module path of the shared block that `TorchCheckpoint` wraps.
    """

    name: str
    model: nn.Module
    inputs: tuple
    kwargs: dict[str, Any]
    loss_fn: Callable[[Any, Tensor], Tensor]
    target: Tensor
    shared_path: str

    def loss(self, out: Any) -> Tensor:
        """The scalar loss of ``out``."""
        return self.loss_fn(out, self.target)

    def run(self, module: nn.Module) -> Any:
        """``module(*inputs, **kwargs)``."""
        return module(*self.inputs, **self.kwargs)

    def compress(self, module: nn.Module, config: laser_fx.LaserConfig) -> nn.Module:
        """`laser_fx.compress` ``module`` (a copy of the model) in place on these inputs."""
        return laser_fx.compress(module, config=config, example_inputs=self.inputs,
                                 example_kwargs=self.kwargs)

    def to(self, device: str) -> None:
        """Move the model, inputs and target."""
        self.model.to(device)
        self.inputs = tuple(t.to(device) for t in self.inputs)
        self.kwargs = {k: v.to(device) if isinstance(v, Tensor) else v
                       for k, v in self.kwargs.items()}
        self.target = self.target.to(device)


@dataclass
class Arm:
    """One configuration: the model it trains (a copy for every arm but the first)."""

    name: str
    module: nn.Module
    laser: bool

    @property
    def params(self) -> list[nn.Parameter]:
        """Trainable parameters, in the order of the uncompressed model's (same paths)."""
        return [p for p in self.module.parameters() if p.requires_grad]


class TorchCheckpoint(nn.Module):
    """Wraps a shared block so that each call is an exact non-reentrant torch checkpoint."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def sync(device: torch.device | str) -> None:
    """Wait for queued kernels, so that a clock read after it covers them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


#: the text of torch's warning under ``torch.cuda.set_sync_debug_mode("warn")``
_SYNC_WARNING = "synchronizing CUDA operation"


@contextmanager
def host_syncs(device: torch.device | str) -> Iterator[Counter[str]]:
    """Count the operations inside that make the host wait for a CUDA device, by the Python
    line that called each (``"file.py:123"``), under ``torch.cuda.set_sync_debug_mode("warn")``
    (``.item()``, ``float()``, ``nonzero``, a copy to pageable host memory, ...; not a wait on
    an event). Other warnings raised inside are re-issued. Counts nothing on a CPU.
    """
    found: Counter[str] = Counter()
    if torch.device(device).type != "cuda":
        yield found
        return
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(before)
    for w in caught:
        if _SYNC_WARNING in str(w.message):
            parts = w.filename.replace("\\", "/").split("/")
            found["/".join(parts[-2:]) + f":{w.lineno}"] += 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def machine() -> str:
    """One line: CPU model (or GPU name), torch version, threads."""
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                    if ln.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}{gpu}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")


def _trm_loss(out: Any, labels: Tensor) -> Tensor:
    logits, q_halt = out[0], out[1]
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    return ce + 0.5 * F.binary_cross_entropy_with_logits(q_halt.float(), torch.ones_like(q_halt))


def trm_workload(*, mixer: str, d: int = 64, n: int = 3, T: int = 2, batch: int = 64,
                 task: str | None = None, size: int | None = None, seed: int = 0) -> Workload:
    """The TRM example model (examples/trm) on generated puzzles, random init.

    Args:
        mixer: "attn" or "mlp_t".
        d, n, T, batch: TRMConfig hidden_size, n, T and the batch size.
        task, size: puzzle ("sudoku" 6 for mlp_t, "maze" 7 for attn by default, as in the
            TRM experiment).
        seed: weights and puzzles.

    Returns:
        The `Workload` (shared block: ``net``).
    """
    from examples.trm.data import make_dataset, seq_len, vocab_size
    from examples.trm.model import TRM, TRMConfig

    task = task or ("sudoku" if mixer == "mlp_t" else "maze")
    size = size or (6 if task == "sudoku" else 7)
    cfg = TRMConfig(vocab_size=vocab_size(task, size), seq_len=seq_len(task, size),
                    hidden_size=d, num_heads=max(1, d // 32) if d >= 128 else 4, n=n, T=T,
                    mixer=mixer)
    torch.manual_seed(seed)
    model = TRM(cfg)
    x, y = make_dataset(task, size, batch, seed)
    y0, z0 = model.initial_carry(batch)
    return Workload(
        name=f"TRM {mixer} D={d} n={n} T={T} {task} {size}x{size} batch {batch}",
        model=model, inputs=(x, y0, z0), kwargs={}, loss_fn=_trm_loss, target=y,
        shared_path="net",
    )


def albert_workload(*, layers: int = 6, batch: int = 16, seq: int = 32, seed: int = 0) -> Workload:
    """The ALBERT example (examples/hf_albert.py): hidden 128, ``layers`` layers sharing one."""
    from examples.hf_albert import albert_config, loss_fn, make_batch, make_model

    cfg = albert_config(vocab=100, max_len=64, layers=layers)
    gen = torch.Generator().manual_seed(seed)
    b = make_batch(gen, batch, seq, 100)
    return Workload(
        name=f"ALBERT hidden 128, {layers} layers sharing 1, batch {batch}, length {seq}",
        model=make_model(cfg, seed), inputs=(), kwargs=dict(b.inputs),
        loss_fn=lambda out, target: loss_fn(out, target)[0], target=b.target,
        shared_path="albert.encoder.albert_layer_groups.0",
    )


def _torch_checkpointed(model: nn.Module, path: str) -> nn.Module:
    """``model`` with its block at ``path`` wrapped (in place) to run as an exact torch checkpoint."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent.register_module(leaf, TorchCheckpoint(parent.get_submodule(leaf)))
    return model


def build_arms(w: Workload, modes: Sequence[str] = tuple(LASER_MODES), combo: bool = True,
               device: str = "cpu") -> tuple[list[Arm], dict[str, str]]:
    """Uncompressed, torch checkpoint, the LASER modes and (if ``combo``) LASER linear inside
    torch checkpointing, built on ``device`` (the workload is moved there first).

    Every arm but the uncompressed one is a deep copy of ``w.model`` (same initial weights);
    a LASER arm is that copy compressed in place. The combination wraps the block of a copy
    in a torch checkpoint and compresses that copy with ``mode="linear"``; it is tried with
    one training step, and a failure is recorded in ``notes`` (torch's recomputation in
    backward runs outside the LASER wrapper, so it saves plain linears' tensors where the
    forward saved compressed ones, and torch refuses the mismatch; the other nesting runs,
    but the wrapper's own saved-tensor hooks then take precedence over the checkpoint's, so
    it keeps what LASER linear alone keeps: not a combination worth a row).

    Returns:
        ``(arms, notes)``: arms that could be built, and ``label -> why not`` for those that
        could not.
    """
    w.to(device)
    arms = [Arm("uncompressed", w.model, False),
            Arm("torch checkpoint", _torch_checkpointed(copy.deepcopy(w.model), w.shared_path),
                False)]
    notes: dict[str, str] = {}
    for label in modes:
        cfg = laser_fx.LaserConfig(mode=LASER_MODES[label])
        arms.append(Arm(label, w.compress(copy.deepcopy(w.model), cfg), True))
    if combo:
        label = "LASER linear inside torch checkpoint"
        try:
            twin = _torch_checkpointed(copy.deepcopy(w.model), w.shared_path)
            arm = Arm(label, w.compress(twin, laser_fx.LaserConfig(mode="linear")), True)
            _step(w, arm)  # whether the two compose shows in backward
            arms.append(arm)
        except Exception as e:  # noqa: BLE001 - recorded in the results as the reason
            notes[label] = (f"does not compose: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}")
    return arms, notes


def _step(w: Workload, arm: Arm) -> None:
    w.loss(w.run(arm.module)).backward()
    for p in arm.params:
        p.grad = None


def _grads(w: Workload, arm: Arm) -> Tensor:
    params = arm.params
    gs = torch.autograd.grad(w.loss(w.run(arm.module)), params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten().double()
                      for p, g in zip(params, gs, strict=True)])


def sync_row(found: Counter[str], steps: int) -> dict[str, Any]:
    """``host_syncs_per_step`` and the ``host_sync_sources`` (most frequent first, per step)
    of `host_syncs` counts gathered over ``steps`` steps."""
    return {"host_syncs_per_step": sum(found.values()) / steps,
            "host_sync_sources": {k: n / steps for k, n in found.most_common(6)}}


def sync_sources(row: dict[str, Any]) -> str:
    """``"file.py:12 (3.0), ..."``: where a row's host syncs per step came from ('' if none)."""
    return ", ".join(f"{k} ({n:.1f})" for k, n in row.get("host_sync_sources", {}).items())


def _quantiles(ts: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"step_ms": 1e3 * statistics.median(ts), "q25_ms": 1e3 * q[0], "q75_ms": 1e3 * q[2],
            "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts)}


def measure_arms(w: Workload, arms: list[Arm], *, reps: int, device: str,
                 tracker_reps: int = 2) -> list[dict[str, Any]]:
    """Measure every arm: memory, peak, gradient cosine, step time, tracker share.

    Args:
        w: the workload.
        arms: from `build_arms` (the first one is the uncompressed reference).
        reps: timed steps per arm after one warm-up round (0: memory and gradients only).
        device: "cpu" or "cuda" (the clock is read after a synchronize).
        tracker_reps: extra instrumented steps per LASER arm for the tracker share (time
            inside the trackers' compress, decompress, settle and end_forward:
            `TrackerProbe`).

    Returns:
        One dict per arm; ratios are to the first arm.
    """
    times: dict[str, list[float]] = {a.name: [] for a in arms}
    syncs: dict[str, Counter[str]] = {a.name: Counter() for a in arms}
    for r in range(reps + 1 if reps else 0):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            sync(device)
            t0 = time.perf_counter()
            with host_syncs(device) as found:
                _step(w, arm)
            sync(device)
            if r:  # round 0 warms caches and the trackers' bases
                times[arm.name].append(time.perf_counter() - t0)
                syncs[arm.name].update(found)
    ref = _grads(w, arms[0])
    rows: list[dict[str, Any]] = []
    for arm in arms:
        mem = laser_fx.measure_activation_memory(arm.module, w.inputs, w.loss, kwargs=w.kwargs)
        arm.module.zero_grad(set_to_none=True)
        g = _grads(w, arm)
        row: dict[str, Any] = {
            "arm": arm.name, "after_forward_bytes": mem.after_forward, "peak_bytes": mem.peak,
            "grad_cosine": float(F.cosine_similarity(g, ref, dim=0)),
        }
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base_alloc = torch.cuda.memory_allocated()
            _step(w, arm)
            row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - base_alloc
        if times[arm.name]:
            row.update(_quantiles(times[arm.name]))
            if device.startswith("cuda"):
                row.update(sync_row(syncs[arm.name], len(times[arm.name])))
        if arm.laser and tracker_reps:
            shares = []
            probe = TrackerProbe(device)
            for _ in range(tracker_reps):
                with probe:
                    probe.begin()
                    sync(device)
                    t0 = time.perf_counter()
                    _step(w, arm)
                    sync(device)
                shares.append(probe.seconds / (time.perf_counter() - t0))
            probe.begin()  # drop the records
            row["tracker_share"] = statistics.median(shares)
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["memory_ratio"] = row["after_forward_bytes"] / max(base["after_forward_bytes"], 1)
        row["peak_ratio"] = row["peak_bytes"] / max(base["peak_bytes"], 1)
        if "step_ms" in row and "step_ms" in base:
            row["time_ratio"] = row["step_ms"] / base["step_ms"]
    return rows
