"""Compare LASER's mechanisms on the TRM-like zoo model: activation memory, peak, gradient
cosine to uncompressed, and step time, all measured in one run with the arms interleaved.

This is the measurement behind ``mode="auto"`` (README, "Choosing a mechanism").
About 2-4 minutes on 2 CPU cores at the default size:

    python benchmarks/mechanisms.py --mixer attn
    python benchmarks/mechanisms.py --mixer mlp_t
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import laser_fx
from laser_fx.testing.zoo import TRMLike


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--T", type=int, default=3)
    p.add_argument("--mixer", choices=("attn", "mlp_t"), default="attn")
    p.add_argument("--reps", type=int, default=5, help="timed steps per arm (interleaved)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = TRMLike(d=a.d, seq=a.seq, n=a.n, T=a.T, mixer=a.mixer)
    tokens = torch.randint(0, model.vocab, (a.batch, a.seq))
    params = [q for q in model.parameters() if q.requires_grad]
    arms: dict[str, torch.nn.Module] = {"uncompressed": model}
    for mode in ("linear", "region", "checkpoint"):
        arms[mode] = laser_fx.compress(model, config=laser_fx.LaserConfig(mode=mode),
                                       example_inputs=(tokens,))
    arms["region rank=8"] = laser_fx.compress(
        model, config=laser_fx.LaserConfig(mode="region", rank=8), example_inputs=(tokens,))
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(a.reps + 1):  # first round warms the bases; not timed
        for name, m in arms.items():
            t0 = time.perf_counter()
            _loss(m(tokens)).backward()
            times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(_loss(model(tokens)), params)])
    base = laser_fx.measure_activation_memory(model, (tokens,), _loss)
    model.zero_grad(set_to_none=True)
    t_base = statistics.median(times["uncompressed"][1:])
    rows = []
    for name, m in arms.items():
        mem = laser_fx.measure_activation_memory(m, (tokens,), _loss)
        model.zero_grad(set_to_none=True)
        g = torch.cat([x.flatten() for x in torch.autograd.grad(_loss(m(tokens)), params)])
        t = statistics.median(times[name][1:])
        rows.append({
            "arm": name, "after_forward_bytes": mem.after_forward, "peak_bytes": mem.peak,
            "memory_ratio": mem.after_forward / base.after_forward,
            "peak_ratio": mem.peak / base.peak,
            "grad_cosine": float(F.cosine_similarity(g, ref, dim=0)),
            "step_ms": 1e3 * t, "time_ratio": t / t_base,
        })
    print(f"TRM-like D={a.d} seq={a.seq} batch={a.batch} n={a.n} T={a.T} mixer={a.mixer}; "
          f"torch {torch.__version__}, {a.threads} thread(s), {platform.machine()} "
          f"{platform.processor() or ''}; random init, random tokens\n")
    print("| arm | activation memory | peak | grad cosine | step time |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['memory_ratio']:.3f}x ({r['after_forward_bytes'] / 2**20:.1f} MiB)"
              f" | {r['peak_ratio']:.3f}x | {r['grad_cosine']:.5f} | {r['step_ms']:.0f} ms "
              f"({r['time_ratio']:.2f}x) |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
