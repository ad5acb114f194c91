"""Gradient fidelity vs the energy kept: how close LASER's gradients are to uncompressed ones,
and what each setting stores, on the TRM example model (random init).

``energy`` is the fraction of each stored activation's squared norm that its basis keeps, so
0.99 leaves a relative reconstruction error of up to 10% per stored tensor; the errors of a
recursion's calls meet in backward. This sweep shows what that costs in gradient direction:

    python benchmarks/fidelity.py                       # D=64, a few seconds per setting
    python benchmarks/fidelity.py --device cuda --d 512 --n 6 --T 3 --batch 256
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `laser_fx` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import laser_fx
from benchmarks._common import machine, sync, trm_workload

__all__ = ["main", "sweep"]


def _grads(w, module) -> torch.Tensor:
    g = torch.autograd.grad(w.loss(w.run(module)), list(module.parameters()))
    return torch.cat([t.flatten().double() for t in g])


def sweep(*, mixer: str, d: int, n: int, T: int, batch: int, energies, modes, device: str,
          warm_steps: int = 3) -> list[dict]:
    """One row per (mode, energy): gradient cosine and relative error vs uncompressed (after
    `warm_steps` steps, so the bases are tracked, not fresh), bytes kept after forward.
    Each setting compresses its own deep copy of the model in place (same weights)."""
    w = trm_workload(mixer=mixer, d=d, n=n, T=T, batch=batch)
    w.to(device)
    ref = _grads(w, w.model)
    base = laser_fx.measure_activation_memory(w.model, w.inputs, w.loss).after_forward
    rows = []
    for mode in modes:
        for energy in energies:
            cfg = laser_fx.LaserConfig(mode=mode, energy=energy)
            cm = w.compress(copy.deepcopy(w.model), cfg)
            for _ in range(warm_steps):
                _grads(w, cm)
            g = _grads(w, cm)
            mem = laser_fx.measure_activation_memory(cm, w.inputs, w.loss).after_forward
            sync(device)
            rep = laser_fx.report(cm)
            rows.append({
                "model": w.name, "mode": mode, "energy": energy,
                "grad_cosine": float(F.cosine_similarity(g, ref, dim=0)),
                "grad_rel_error": float((g - ref).norm() / ref.norm()),
                "memory_ratio": mem / max(base, 1),
                "ranks": sorted({r for s in rep.to_dict()["sites"] for r in s["ranks"]}),
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mixers", nargs="+", default=["attn", "mlp_t"], choices=("attn", "mlp_t"))
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--T", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--energies", type=float, nargs="+", default=[0.99, 0.999, 0.9999])
    p.add_argument("--modes", nargs="+", default=["auto", "region"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"# {machine()}")
    print("| model | mode | energy | grad cosine | grad rel. error | act. memory | ranks |")
    print("|---|---|---|---|---|---|---|")
    for mixer in a.mixers:
        rows = sweep(mixer=mixer, d=a.d, n=a.n, T=a.T, batch=a.batch, energies=a.energies,
                     modes=a.modes, device=a.device)
        for r in rows:
            print(f"| {r['model']} | {r['mode']} | {r['energy']} | {r['grad_cosine']:.5f} |"
                  f" {r['grad_rel_error']:.4f} | {r['memory_ratio']:.3f}x | {r['ranks']} |")
            if a.out is not None:
                with a.out.open("a") as f:
                    f.write(json.dumps({**r, "machine": machine()}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
