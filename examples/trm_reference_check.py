"""Compress the PUBLIC TRM reference implementation, as its training loop calls it.

Needs a checkout of the reference (github.com/SamsungSAILMontreal/TinyRecursiveModels; its
``models/`` package is imported from ``--reference-dir``, nothing of it is copied here). Builds
`ACTLossHead(TinyRecursiveReasoningModel_ACTV1(...))` at a small size on the CPU, compresses a
deep copy with `laser_fx.compress(model, example_kwargs=dict(carry=..., batch=...,
return_keys=[]))` (the call `pretrain.py` makes), runs ACT training steps on both copies in
lockstep (carry carried over, AdamW in between), and prints compress time, activation
memory, gradient cosine and whether the losses and carries agree. ~10 s.

    python examples/trm_reference_check.py --reference-dir /path/to/TinyRecursiveModels
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import laser_fx


def _build(args: argparse.Namespace):
    from models.losses import ACTLossHead  # noqa: PLC0415 - from the user's checkout
    from models.recursive_reasoning.trm import TinyRecursiveReasoningModel_ACTV1  # noqa: PLC0415

    cfg = dict(
        batch_size=args.batch, seq_len=args.seq, puzzle_emb_ndim=0, num_puzzle_identifiers=1,
        vocab_size=11, H_cycles=args.T, L_cycles=args.n, H_layers=0, L_layers=2,
        hidden_size=args.d, expansion=4, num_heads=args.d // 16, pos_encodings="rope",
        halt_max_steps=4, halt_exploration_prob=0.1, forward_dtype=args.dtype,
        mlp_t=args.mlp_t, puzzle_emb_len=0,
    )
    return ACTLossHead(TinyRecursiveReasoningModel_ACTV1(cfg), loss_type="stablemax_cross_entropy")


def _batch(args: argparse.Namespace, g: torch.Generator) -> dict[str, torch.Tensor]:
    inputs = torch.randint(1, 11, (args.batch, args.seq), generator=g)
    labels = torch.randint(2, 11, (args.batch, args.seq), generator=g)
    return {"inputs": inputs, "labels": labels,
            "puzzle_identifiers": torch.zeros(args.batch, dtype=torch.int32)}


def _grads(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in m.parameters() if p.grad is not None])


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-dir", type=Path, required=True,
                   help="checkout of SamsungSAILMontreal/TinyRecursiveModels")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--n", type=int, default=3, help="L_cycles")
    p.add_argument("--T", type=int, default=2, help="H_cycles")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=36)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mlp-t", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--energy", type=float, default=None, help="LaserConfig energy (default: its own)")
    args = p.parse_args(argv)
    if not (args.reference_dir / "models" / "recursive_reasoning" / "trm.py").exists():
        raise SystemExit(f"{args.reference_dir} has no models/recursive_reasoning/trm.py")
    sys.path.insert(0, str(args.reference_dir))
    torch.manual_seed(0)
    base = _build(args)
    g = torch.Generator().manual_seed(1)
    batch = _batch(args, g)
    model = copy.deepcopy(base)
    carry = model.initial_carry(batch)
    config = laser_fx.LaserConfig() if args.energy is None else laser_fx.LaserConfig(energy=args.energy)
    t0 = time.perf_counter()
    laser_fx.compress(model, config=config,
                      example_kwargs={"carry": carry, "batch": batch, "return_keys": []})
    seconds = time.perf_counter() - t0
    print(f"compressed {type(model).__name__} in place in {seconds:.2f} s: "
          f"{[s['name'] + ' (' + s['mechanism'] + ')' for s in laser_fx.report(model).to_dict()['sites']]}")
    print(f"initial_carry kept: {callable(model.initial_carry)}")

    def loss_of(out):
        return out[1]

    kw = {"carry": carry, "batch": batch, "return_keys": []}
    mem_b = laser_fx.measure_activation_memory(copy.deepcopy(base), (), loss_of, kwargs=kw)
    mem_l = laser_fx.measure_activation_memory(copy.deepcopy(model), (), loss_of, kwargs=kw)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (base, model)]
    carries = [base.initial_carry(batch), model.initial_carry(batch)]
    cosines = []
    for step in range(args.steps):
        batch = _batch(args, g)
        outs = []
        for i, m in enumerate((base, model)):
            torch.manual_seed(100 + step)  # same exploration draws in both arms
            carries[i], loss, _, _, _ = m(carry=carries[i], batch=batch, return_keys=[])
            loss.backward()
            outs.append(loss.detach())
        gb, gl = _grads(base), _grads(model)
        cosines.append(min(1.0, torch.nn.functional.cosine_similarity(gb, gl, dim=0).item()))
        print(f"step {step}: loss {outs[0].item():.5f} / {outs[1].item():.5f}, gradient cosine "
              f"{cosines[-1]:.6f}, halted {carries[0].halted.sum().item()} / "
              f"{carries[1].halted.sum().item()}")
        for opt in opts:
            opt.step()
            opt.zero_grad()
    ratio = mem_l.after_forward / mem_b.after_forward
    print(f"activation memory after forward: {mem_b.after_forward / 2**20:.2f} MiB -> "
          f"{mem_l.after_forward / 2**20:.2f} MiB ({ratio:.3f}x); peak {mem_b.peak / 2**20:.2f} "
          f"-> {mem_l.peak / 2**20:.2f} MiB")
    print(laser_fx.report(model))
    return {"compress_seconds": seconds, "memory_ratio": ratio, "min_cosine": min(cosines)}


if __name__ == "__main__":
    main()
