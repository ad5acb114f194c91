"""What one `SubspaceTracker` update costs, next to an exact SVD and the linear op's matmul.

For each width, N tokens of activations with a decaying spectrum (plus a little noise) are
compressed once to fit a basis; then the script times, median of ``--reps`` runs:

- projection: a `compress` call whose basis already fits (the common case: ``C = X Q``, the
  captured energies queued, and the decision about the previous call, taken one call late);
- +1 power iter: the warm-started block subspace iteration a drifting basis costs;
- reset: rebuilding the basis at ``--energy`` (eigendecomposition of the width x width Gram
  matrix up to width 256, randomized subspace iteration above);
- exact SVD: ``torch.linalg.svd(X)``, what a tracker without warm starts would pay each call;
- F.linear: the forward matmul of a square linear layer on the same X.

Takes 1-5 minutes on 2 CPU cores (the exact SVDs dominate). Prints a Markdown table.

``--layouts`` times, instead, the tracker's products in the two layouts of their narrow result
(``--tokens`` x k for each ``--ranks`` k): ``X @ Q`` written ``N x k`` as torch lays it out,
against the ``k x N`` buffer `laser_fx._linalg.skinny` computes (``(Qᵀ Xᵀ)ᵀ``), and likewise
``Xᵀ C`` (a power iteration). Seconds, not minutes.

``--eig`` (CUDA only) times the eigendecomposition of a refinement's ``k x k`` fp64 Gram
matrix for each ``--ranks`` k: the device's solver (``torch.linalg.eigh``, which waits for
the device to check its result) against `laser_fx._linalg.sym_eig_desc` (one copy to the
host, the host's solver, the eigenvectors sent back asynchronously); mean of ``--reps``
after 5 warm-ups, the device synchronised around the loop.

Example::

    PYTHONPATH=. .venv/bin/python benchmarks/tracker_cost.py --reps 5
    PYTHONPATH=. .venv/bin/python benchmarks/tracker_cost.py --layouts --widths 128 384 \
        --tokens 784 --ranks 4 6 11 16 29 --reps 200 --threads 1
    PYTHONPATH=. python3 benchmarks/tracker_cost.py --eig --ranks 8 16 32 64 --reps 50
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from laser_fx._linalg import skinny, sym_eig_desc
from laser_fx.config import LaserConfig
from laser_fx.tracker import SubspaceTracker


def _median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: first calls pay for lazy library initialisation
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _activations(n: int, width: int, decay: float, gen: torch.Generator) -> torch.Tensor:
    """``n x width`` data whose i-th singular value is ``exp(-i / decay)``, plus 0.1% noise."""
    r = min(width, 8 * int(decay) + 8)
    spectrum = torch.exp(-torch.arange(r, dtype=torch.float32) / decay)
    x = (torch.randn(n, r, generator=gen) * spectrum) @ torch.randn(r, width, generator=gen)
    return x / width**0.5 + 1e-3 * torch.randn(n, width, generator=gen) / width**0.5


def _row(width: int, args: argparse.Namespace) -> dict[str, float]:
    gen = torch.Generator().manual_seed(width)
    x = _activations(args.tokens, width, args.decay, gen)
    weight = torch.randn(width, width, generator=gen) / width**0.5
    tracker = SubspaceTracker(width, LaserConfig(energy=args.energy, fidelity=args.fidelity))
    tracker.compress(x)  # fit the basis
    xm = x.reshape(-1, width)
    total = float(xm.square().sum())
    return {
        "k": float(tracker.basis.shape[1]),
        "projection": _median_ms(lambda: tracker.compress(x), args.reps),
        # the update paths are timed directly: forcing them through `compress` would need
        # data that drifts by just the right amount
        "power": _median_ms(lambda: tracker._power_update(xm, total), args.reps),
        "reset": _median_ms(lambda: tracker._reset(xm, total), args.reps),
        "svd": _median_ms(lambda: torch.linalg.svd(xm, full_matrices=False), args.reps),
        "matmul": _median_ms(lambda: F.linear(x, weight), args.reps),
    }


def _layout_row(width: int, k: int, args: argparse.Namespace) -> dict[str, float]:
    gen = torch.Generator().manual_seed(width + k)
    x = torch.randn(args.tokens, width, generator=gen)
    q = torch.randn(width, k, generator=gen)
    c = torch.randn(args.tokens, k, generator=gen)
    return {
        "X @ Q": _median_ms(lambda: x @ q, args.reps),
        "skinny(X, Q)": _median_ms(lambda: skinny(x, q), args.reps),
        "Xᵀ @ C": _median_ms(lambda: x.T @ c, args.reps),
        "skinny(Xᵀ, C)": _median_ms(lambda: skinny(x.T, c), args.reps),
    }


def _layouts(args: argparse.Namespace) -> list[dict[str, float]]:
    names = ("X @ Q", "skinny(X, Q)", "Xᵀ @ C", "skinny(Xᵀ, C)")
    print("| width | k | " + " | ".join(f"{n} (ms)" for n in names)
          + " | X @ Q / skinny | Xᵀ @ C / skinny |")
    print("|---:|---:|" + "---:|" * (len(names) + 2))
    rows = []
    for width in args.widths:
        for k in args.ranks:
            r = _layout_row(width, k, args)
            rows.append({"width": width, "k": k, **r})
            print(f"| {width} | {k} | " + " | ".join(f"{r[n]:.3f}" for n in names)
                  + f" | {r['X @ Q'] / r['skinny(X, Q)']:.2f} | "
                  f"{r['Xᵀ @ C'] / r['skinny(Xᵀ, C)']:.2f} |", flush=True)
    return rows


def _eig(args: argparse.Namespace) -> list[dict[str, float]]:
    """Device solver against the host round trip, for each ``k`` in ``--ranks`` (CUDA)."""
    print("| k | torch.linalg.eigh on the GPU (us) | sym_eig_desc: via the host (us) | ratio |")
    print("|---:|---:|---:|---:|")
    rows = []
    for k in args.ranks:
        a = torch.randn(4096, k, device="cuda", dtype=torch.float64)
        g = a.T @ a
        us = []
        for fn in (torch.linalg.eigh, sym_eig_desc):
            for _ in range(5):
                fn(g)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.reps):
                fn(g)
            torch.cuda.synchronize()
            us.append(1e6 * (time.perf_counter() - start) / args.reps)
        rows.append({"k": k, "device_us": us[0], "host_us": us[1]})
        print(f"| {k} | {us[0]:.0f} | {us[1]:.0f} | {us[0] / us[1]:.2f} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """Parse arguments, time every width, print the Markdown table; returns its rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024, 1536])
    parser.add_argument("--tokens", type=int, default=2048, help="rows N of the activation")
    parser.add_argument("--reps", type=int, default=5, help="repetitions; the median is shown")
    parser.add_argument("--energy", type=float, default=0.99)
    parser.add_argument("--fidelity", type=float, default=0.95)
    parser.add_argument("--decay", type=float, default=8.0, help="spectrum decay length")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 is steadier on a busy CPU)"
    )
    parser.add_argument("--layouts", action="store_true",
                        help="time the two layouts of the tracker's narrow products instead")
    parser.add_argument("--eig", action="store_true",
                        help="time a refinement's eigendecomposition on the GPU and via the host")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 6, 11, 16, 29],
                        help="with --layouts: the k columns of Q and C; with --eig: the orders")
    args = parser.parse_args(argv)
    if args.eig and not torch.cuda.is_available():
        parser.error("--eig compares a CUDA device's solver with the host's: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, N={args.tokens}, energy={args.energy}, "
        f"median of {args.reps} (ms)\n"
    )
    if args.layouts:
        return _layouts(args)
    if args.eig:
        return _eig(args)
    print(
        "| width | k | projection | +1 power iter | reset | exact SVD | F.linear | proj / matmul |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for width in args.widths:
        r = _row(width, args)
        rows.append({"width": width, **r})
        print(
            f"| {width} | {int(r['k'])} | {r['projection']:.2f} | {r['power']:.2f} | "
            f"{r['reset']:.1f} | {r['svd']:.1f} | {r['matmul']:.2f} | "
            f"{r['projection'] / r['matmul']:.2f} |",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
