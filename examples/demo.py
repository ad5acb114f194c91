"""laser_fx demo: find the weight-shared sites of a small Tiny-Recursive-Model-like network,
compress it, and compare the activation memory kept for backward with and without LASER.

Runs in well under a minute on 2 CPU cores:  make demo  (or: python examples/demo.py).
"""

from __future__ import annotations

import argparse
import time

import torch

import laser_fx
from laser_fx.testing.zoo import TRMLike


def _step_time(model, tokens, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(tokens).float().pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=128, help="model width D")
    p.add_argument("--seq", type=int, default=64, help="sequence length")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n", type=int, default=6, help="inner z-updates per cycle")
    p.add_argument("--T", type=int, default=3, help="cycles (first T-1 under no_grad)")
    p.add_argument("--mixer", choices=("attn", "mlp_t"), default="attn")
    p.add_argument("--mode", choices=laser_fx.config.MODES, default="auto")
    p.add_argument("--rank", type=int, default=None, help="fixed rank (default: by energy)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per arm")
    a = p.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = TRMLike(d=a.d, seq=a.seq, n=a.n, T=a.T, mixer=a.mixer)
    tokens = torch.randint(0, model.vocab, (a.batch, a.seq))
    print(f"TRM-like model: D={a.d}, seq={a.seq}, batch={a.batch}, n={a.n}, T={a.T}, "
          f"mixer={a.mixer}\n")
    print("Weight-shared sites (laser_fx.find_sites):")
    for site in laser_fx.find_sites(model, (tokens,)):
        print(f"  {site}")

    config = laser_fx.LaserConfig(mode=a.mode, rank=a.rank)
    cmodel = laser_fx.compress(model, config=config, example_inputs=(tokens,))
    loss = lambda out: out.float().pow(2).mean()  # noqa: E731
    cmodel(tokens).float().pow(2).mean().backward()  # one step to build the bases
    base = laser_fx.measure_activation_memory(model, (tokens,), loss)
    comp = laser_fx.measure_activation_memory(cmodel, (tokens,), loss)
    t_base = _step_time(model, tokens, a.reps)
    t_comp = _step_time(cmodel, tokens, a.reps)
    model.zero_grad(set_to_none=True)

    print(f"\nLASER report ({config.mode} mode):")
    print(laser_fx.report(cmodel))
    print("\nActivation memory kept for backward (bytes tracked by allocation):")
    print(f"  uncompressed : {base.after_forward / 2**20:8.2f} MiB  (peak {base.peak / 2**20:.2f} MiB)")
    print(f"  LASER        : {comp.after_forward / 2**20:8.2f} MiB  (peak {comp.peak / 2**20:.2f} MiB)")
    print(f"  ratio        : {comp.ratio_to(base):.3f}x")
    print(f"Step time (median of {a.reps}): {t_base * 1e3:.0f} ms -> {t_comp * 1e3:.0f} ms "
          f"({t_comp / t_base:.2f}x)")


if __name__ == "__main__":
    main()
