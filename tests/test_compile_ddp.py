"""`torch.compile` of a compressed model, and `DistributedDataParallel` (gloo, 2 CPU processes).

Pinned here:

* ``torch.compile(compress(model))`` with ``backend="eager"`` / ``"aot_eager"`` gives the
  gradients and tracker state of the eager compressed model (bitwise for ``linear`` and
  ``checkpoint``; ``region`` under ``aot_eager`` compresses what the AOT graph saves, which is
  a different but equally faithful set of tensors). ``inductor`` is opt-in
  (``LASER_FX_TEST_INDUCTOR=1``: a C++ build per graph, ~10 s per mechanism here).
* DDP on the compressed TRM-like model: losses and gradients of 3 SGD steps equal a
  single-process run on the same global batch (lossless config); with the default config and
  DDP's default ``broadcast_buffers=True`` the ranks' trackers pick different ranks and the
  buffer broadcast aborts the process group (xfail; see /work/notes/reliability.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import laser_fx
from laser_fx import LaserConfig
from laser_fx.testing.zoo import ZOO, TRMLike

MECHANISMS = ("linear", "region", "checkpoint")


def _loss(out: torch.Tensor) -> torch.Tensor:
    # not mean(out²): a LayerNorm output's mean square is ~1 whatever the weights, so that
    # loss has ~0 gradients and any gradient error would hide under atol
    return out.float().cumsum(-1).pow(2).mean()


def _params(m: nn.Module) -> list[torch.Tensor]:
    return [p for p in m.parameters() if p.requires_grad]


def _flat(gs) -> torch.Tensor:
    return torch.cat([g.float().flatten() for g in gs])


def _rel(a, b) -> float:
    fa, fb = _flat(a), _flat(b)
    return float((fa - fb).norm() / fb.norm())


# ------------------------------------------------------------------ torch.compile


@pytest.fixture
def dynamo():
    """Fresh dynamo caches; ``recompile_limit=1``.

    The tracker's Python (data-dependent ranks, ``float()`` of norms) makes dynamo recompile
    its frames per width and rank until the limit, then run them eagerly; a limit of 1 reaches
    the same eager fallback at once (25 s -> 5 s per mechanism on this machine).
    """
    torch._dynamo.reset()
    torch._logging.set_logs(dynamo=logging.ERROR)
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=1):
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


def _compile_case(backend: str, mode: str, energy: float, model_name: str = "unrolled_rnn"):
    sizes = dict(steps=3, d_hidden=16) if model_name == "unrolled_rnn" else {}
    if model_name == "trm_small":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = TRMLike(d=32, seq=8, n=2, T=2)
        inputs = (
            torch.randint(0, model.vocab, (2, 8), generator=torch.Generator().manual_seed(0)),
        )
    else:
        model, inputs = ZOO[model_name](**sizes)
    cfg = LaserConfig(mode=mode, energy=energy, min_numel=0)
    eager = laser_fx.compress(model, config=cfg, example_inputs=inputs)
    compiled = torch.compile(
        laser_fx.compress(model, config=cfg, example_inputs=inputs), backend=backend
    )
    return model, inputs, eager, compiled


@pytest.mark.parametrize("mode", MECHANISMS)
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_equals_eager_laser(dynamo, backend, mode):
    model, inputs, eager, compiled = _compile_case(backend, mode, energy=0.9)
    params = _params(model)
    for _ in range(2):  # cold, then warm trackers
        out_c, out_e = compiled(*inputs), eager(*inputs)
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
        g_c = torch.autograd.grad(_loss(out_c), params)
        g_e = torch.autograd.grad(_loss(out_e), params)
        for a, b in zip(g_c, g_e, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    se = eager.laser_fx.state_dict()
    sc = compiled._orig_mod.laser_fx.state_dict()
    assert se.keys() == sc.keys() and se, "compiled run tracked other slots"
    for k in se:
        torch.testing.assert_close(sc[k], se[k], rtol=1e-6, atol=1e-7, msg=k)


def test_compiled_region_aot_eager_trm_is_faithful(dynamo):
    """aot_eager saves other tensors than eager; region packs those. Pin: lossless at
    energy=1.0 and, at the default energy, no further from the dense gradient than eager."""
    for energy in (1.0, 0.99):
        model, inputs, eager, compiled = _compile_case("aot_eager", "region", energy, "trm_small")
        params = _params(model)
        dense = torch.autograd.grad(_loss(model(*inputs)), params)
        for _ in range(2):
            out_c = compiled(*inputs)
            torch.testing.assert_close(out_c, model(*inputs), rtol=0, atol=0)
            g_c = torch.autograd.grad(_loss(out_c), params)
            g_e = torch.autograd.grad(_loss(eager(*inputs)), params)
            if energy == 1.0:
                assert _rel(g_c, dense) < 1e-4, _rel(g_c, dense)
            else:
                assert _rel(g_c, dense) <= max(2 * _rel(g_e, dense), 1e-3), (
                    _rel(g_c, dense),
                    _rel(g_e, dense),
                )
        stats = laser_fx.report(compiled._orig_mod).to_dict()["totals"]
        assert stats["stored_bytes"] < stats["dense_bytes"], stats  # it still compresses
        torch._dynamo.reset()


_INDUCTOR = os.environ.get("LASER_FX_TEST_INDUCTOR") == "1"
_REGION_STRIDE = pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="region's unpack returns a contiguous reconstruction of a strided saved tensor "
    "(x[:, t]); inductor's compiled backward asserts the saved strides",
)


@pytest.mark.skipif(
    not _INDUCTOR or shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="inductor is opt-in (LASER_FX_TEST_INDUCTOR=1; ~10 s per mechanism)",
)
@pytest.mark.parametrize(
    "mode", ["linear", pytest.param("region", marks=_REGION_STRIDE), "checkpoint"]
)
def test_compiled_inductor_equals_eager_laser(dynamo, mode):
    model, inputs, eager, compiled = _compile_case("inductor", mode, energy=0.9)
    params = _params(model)
    start = time.monotonic()
    for _ in range(2):
        g_c = torch.autograd.grad(_loss(compiled(*inputs)), params)
        g_e = torch.autograd.grad(_loss(eager(*inputs)), params)
        assert _rel(g_c, g_e) < 1e-5, _rel(g_c, g_e)
    assert time.monotonic() - start < 120, "inductor compile took too long"


# ------------------------------------------------------------------ DistributedDataParallel

_WORLD = 2
_STEPS = 3
_GLOBAL_BATCH = 4
#: (name, config kwargs, broadcast_buffers) run one after another in one process group
_DDP_ARMS = [
    ("lossless-nobcast", dict(energy=1.0, min_numel=0), False),
    ("default-nobcast", dict(min_numel=0), False),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))  # loopback only
        return int(s.getsockname()[1])


def _ddp_model(cfg_kwargs: dict) -> tuple[TRMLike, nn.Module]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TRMLike(d=32, seq=8, n=2, T=2)
    example = torch.randint(0, model.vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, laser_fx.compress(
        model, config=LaserConfig(**cfg_kwargs), example_inputs=(example,)
    )


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10)
    return [torch.randint(0, 12, (_GLOBAL_BATCH, 8), generator=g) for _ in range(_STEPS)]


def _train(run: nn.Module, model: nn.Module, batches, rank: int | None):
    """SGD steps; returns [(global loss, [grads])]. rank=None: the whole batch, one process."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = []
    for xs in batches:
        local = xs if rank is None else xs.chunk(_WORLD)[rank]
        loss = _loss(run(local))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        total = loss.detach().clone()
        if rank is not None:
            dist.all_reduce(total)
            total /= _WORLD
        out.append((float(total), [p.grad.detach().clone() for p in _params(model)]))
        opt.step()
    return out


def _ddp_worker(rank: int, port: int, out_dir: str, arms: list) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=_WORLD)
    try:
        results = {}
        for name, cfg_kwargs, bcast in arms:
            model, cmodel = _ddp_model(cfg_kwargs)
            ddp = DDP(cmodel, broadcast_buffers=bcast)
            results[name] = _train(ddp, model, _batches(), rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(out_dir: str, arms: list, timeout: float = 90.0) -> None:
    """Run `_ddp_worker` on 2 processes; never hang: processes are terminated after timeout."""
    ctx = mp.spawn(_ddp_worker, args=(_free_port(), out_dir, arms), nprocs=_WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"DDP workers did not finish within {timeout} s")


def test_ddp_matches_single_process(tmp_path):
    _spawn(str(tmp_path), _DDP_ARMS)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(_WORLD)]
    for name, cfg_kwargs, _ in _DDP_ARMS:
        model, cmodel = _ddp_model(cfg_kwargs)
        single = _train(cmodel, model, _batches(), None)
        for step, ((l0, g0), (l1, g1), (ls, gs)) in enumerate(
            zip(ranks[0][name], ranks[1][name], single, strict=True)
        ):
            where = f"{name} step {step}"
            lossless = cfg_kwargs.get("energy") == 1.0
            # lossy arm: the weights drift apart by the (different) compression error per step
            assert l0 == l1, (where, l0, l1)  # the all-reduced loss
            assert abs(l0 - ls) <= (1e-5 if lossless else 2e-2) * abs(ls), (where, l0, ls)
            for a, b in zip(g0, g1, strict=True):  # all-reduced: identical on both ranks
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=where)
            if lossless:
                floor = 1e-6 * float(_flat(gs).norm())  # near-zero grads: rounding noise
                for i, (a, b) in enumerate(zip(g0, gs, strict=True)):
                    err = float((a - b).norm())
                    assert err <= 1e-4 * float(b.norm()) + floor, (where, i, err, float(b.norm()))
            else:  # each rank compresses its own half: another (equally faithful) approximation
                cos = torch.nn.functional.cosine_similarity(_flat(g0), _flat(gs), dim=0)
                assert cos > 0.98, (where, float(cos))


@pytest.mark.xfail(
    strict=True,
    raises=mp.ProcessExitedException,
    reason="DDP's default broadcast_buffers=True broadcasts tracker bases whose rank "
    "differs between ranks: gloo aborts (size mismatch); trackers are per-rank state. "
    "Use DDP(cmodel, broadcast_buffers=False) (README, Reliability)",
)
def test_ddp_default_config_with_broadcast_buffers(tmp_path):
    _spawn(str(tmp_path), [("default-bcast", dict(min_numel=0), True)])
    assert (tmp_path / "rank0.pt").exists()
