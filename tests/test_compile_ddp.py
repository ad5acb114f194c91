"""`torch.compile` of a compressed model, and `DistributedDataParallel` (gloo, 2 CPU processes).

Pinned here:

* ``torch.compile(model)`` of a model compressed in place, with ``backend="eager"`` /
  ``"aot_eager"``, gives the gradients and tracker state of the eager compressed model in
  linear and checkpoint modes (tiny models: compiling is slow on this machine). Each
  checkpointed call is traced into the graph (`tests/test_traced.py`), and each linear op of a
  linear-mode call too (`tests/test_traced_linear.py`). In
  region mode the compiled block runs inside the saved-tensor hooks, which pack what the
  compiled graph saves: exact forward, gradients as close to the exact ones as eager
  region mode's. ``inductor`` is opt-in
  (``LASER_FX_TEST_INDUCTOR=1``: a C++ build per graph, ~10 s per mechanism here).
* DDP on the TRM-like model compressed in place: losses and gradients of 3 SGD steps equal a
  single-process run on the same global batch (lossless config), also with DDP's default
  ``broadcast_buffers=True`` and the default (lossy) config, where the ranks' trackers pick
  different ranks: trackers are per-rank state outside the module tree, so DDP never
  broadcasts them (issue 14; the GraphModule design aborted the process group here).
"""

from __future__ import annotations

import copy
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
from laser_fx import LaserConfig, SiteWrapper
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


def _tracker_states(cmodel: nn.Module) -> dict[str, torch.Tensor]:
    # by slot, without the role: these tests compare what the trackers hold, not how calls
    # are assigned to roles (tests/test_traced*.py check roles)
    return {
        f"{w.site.name}.{slot.partition('@')[0]}.{k}": v
        for w in cmodel.modules() if isinstance(w, SiteWrapper)
        for slot, t in w.trackers.items()
        for k, v in t.state_dict().items()
    }


def _backward(loss: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    """The parameter gradients of ``loss.backward()`` (what training loops call)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad for p in _params(model)]


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


def _compile_case(backend: str, mode: str, energy: float):
    model, inputs = ZOO["unrolled_rnn"](steps=3, d_hidden=16)
    cfg = LaserConfig(mode=mode, energy=energy, min_numel=0, compile_backend=backend)
    # compress works in place: one copy stays eager, one is compiled, `model` stays dense
    eager = laser_fx.compress(copy.deepcopy(model), config=cfg, example_inputs=inputs)
    compiled = torch.compile(
        laser_fx.compress(copy.deepcopy(model), config=cfg, example_inputs=inputs),
        backend=backend,
    )
    return model, inputs, eager, compiled


# aot_eager only (it runs dynamo AND traces the backward): each compile costs seconds here.
# Region mode compresses what the compiled graph saves, not what eager saves: its own test.
@pytest.mark.parametrize("mode", ["linear", "checkpoint"])
def test_compiled_equals_eager_laser(dynamo, mode, backend="aot_eager"):
    model, inputs, eager, compiled = _compile_case(backend, mode, energy=0.9)
    for _ in range(2):  # cold, then warm trackers
        out_c, out_e = compiled(*inputs), eager(*inputs)
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
        # loss.backward(): a traced checkpoint adds its parameter gradients to .grad
        g_c, g_e = _backward(_loss(out_c), compiled), _backward(_loss(out_e), eager)
        for a, b in zip(g_c, g_e, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    se = _tracker_states(eager)
    sc = _tracker_states(compiled._orig_mod)
    assert se.keys() == sc.keys() and se, "compiled run tracked other slots"
    for k in se:
        torch.testing.assert_close(sc[k], se[k], rtol=1e-6, atol=1e-7, msg=k)


def _rel_error(model, inputs, cmodel) -> float:
    exact = torch.autograd.grad(_loss(model(*inputs)), _params(model))
    return _rel(torch.autograd.grad(_loss(cmodel(*inputs)), _params(cmodel)), exact)


@pytest.mark.parametrize("energy", [1.0, 0.99])
def test_compiled_region_compresses_what_the_compiled_graph_saves(dynamo, energy):
    # Under torch.compile a region call runs the compiled block inside the saved-tensor
    # hooks: the tensors packed are the compiled graph's (trackers "compiled<i>"), the
    # forward stays exact, and the gradient error is of eager region mode's order
    model, inputs = ZOO["trm_attn"](batch=8, d=32, seq=16, n=2, T=1)
    cfg = LaserConfig(mode="region", energy=energy, compile_backend="aot_eager")
    eager = laser_fx.compress(copy.deepcopy(model), config=cfg, example_inputs=inputs)
    compiled = torch.compile(
        laser_fx.compress(copy.deepcopy(model), config=cfg, example_inputs=inputs),
        backend="aot_eager")
    for _ in range(2):  # cold, then warm trackers
        torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-6, atol=1e-6)
        err_c = _rel_error(model, inputs, compiled)
        err_e = _rel_error(model, inputs, eager)
    (wrapper,) = [m for m in compiled._orig_mod.modules() if isinstance(m, SiteWrapper)]
    used = {k for k, t in wrapper.trackers.items() if t.stats()["calls"]}
    assert any(k.startswith("compiled") for k in used), used
    stats = wrapper.stats
    assert stats.dense_bytes > 0, "the compiled graph's saved tensors never reached a tracker"
    if energy == 1.0:
        assert err_c < 1e-5, err_c
    else:
        assert stats.total_stored_bytes < stats.uncompressed_bytes
        assert 1e-7 < err_c < max(3 * err_e, 1e-3), (err_c, err_e)


_INDUCTOR = os.environ.get("LASER_FX_TEST_INDUCTOR") == "1"


@pytest.mark.skipif(
    not _INDUCTOR or shutil.which("gcc") is None and shutil.which("cc") is None,
    reason="inductor is opt-in (LASER_FX_TEST_INDUCTOR=1; ~10 s per mechanism)",
)
@pytest.mark.parametrize("mode", ["linear", "region", "checkpoint"])
def test_compiled_inductor_equals_eager_laser(dynamo, mode):
    model, inputs, eager, compiled = _compile_case("inductor", mode, energy=0.9)
    start = time.monotonic()
    for _ in range(2):
        g_c = _backward(_loss(compiled(*inputs)), compiled)
        g_e = _backward(_loss(eager(*inputs)), eager)
        assert _rel(g_c, g_e) < 1e-5, _rel(g_c, g_e)
    assert time.monotonic() - start < 120, "inductor compile took too long"


# ------------------------------------------------------------------ DistributedDataParallel

_WORLD = 2
_STEPS = 3
_GLOBAL_BATCH = 4
#: (name, config kwargs, broadcast_buffers, torch.compile backend of the DDP module or None)
#: run one after another in one process group
_DDP_ARMS = [
    ("lossless-nobcast", dict(energy=1.0, min_numel=0), False, None),
    ("default", dict(min_numel=0), True, None),  # ranks' trackers differ: must not be broadcast
    # compiled DDP: the traced checkpoint must hand the gradients to DDP's reducer (returned
    # through autograd), not add them to .grad behind its back
    ("compiled-lossless", dict(energy=1.0, min_numel=0, compile_backend="aot_eager"), False,
     "aot_eager"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))  # loopback only
        return int(s.getsockname()[1])


def _ddp_model(cfg_kwargs: dict) -> TRMLike:
    """The TRM-like model, compressed in place (the same object)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TRMLike(d=32, seq=8, n=2, T=2)
    example = torch.randint(0, model.vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    cmodel = laser_fx.compress(model, config=LaserConfig(**cfg_kwargs), example_inputs=(example,))
    assert cmodel is model
    return model


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
        for name, cfg_kwargs, bcast, backend in arms:
            model = _ddp_model(cfg_kwargs)
            ddp = DDP(model, broadcast_buffers=bcast)
            run = ddp if backend is None else torch.compile(ddp, backend=backend)
            results[name] = _train(run, model, _batches(), rank)
            # DDP sees the user's parameters and buffers only, never tracker state
            assert not any("laser_fx" in n for n, _ in ddp.named_buffers())
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
    for name, cfg_kwargs, _, _ in _DDP_ARMS:
        model = _ddp_model(cfg_kwargs)
        single = _train(model, model, _batches(), None)
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


@pytest.mark.parametrize("mode", ["checkpoint", "region"])
def test_compiled_trm_runs_without_tracing_the_step_hooks(mode):
    # Regression: torch.compile(model) traced the end-of-forward hook into the trackers'
    # decisions: region hit "InternalTorchDynamoError: RecursionError" at its first step and
    # checkpoint recompiled on float values until the limit. The hooks now run eagerly.
    from benchmarks._common import trm_workload

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    w = trm_workload(mixer="attn", d=16, n=2, T=2, batch=2)
    model = laser_fx.compress(copy.deepcopy(w.model), config=LaserConfig(
        mode=mode, compile_backend="aot_eager"), example_inputs=w.inputs, example_kwargs=w.kwargs)
    compiled = torch.compile(model, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            w.loss(compiled(*w.inputs, **w.kwargs)).backward()
    stats = torch._dynamo.utils.counters["stats"]
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)
    assert stats["unique_graphs"] <= 8, dict(stats)
    torch._dynamo.reset()


def test_compiled_block_is_built_once_kept_out_of_the_module_tree_and_not_copied(dynamo):
    model, inputs = ZOO["unrolled_rnn"](steps=3, d_hidden=16)
    laser_fx.compress(model, config=LaserConfig(min_numel=0, compile_backend="eager"),
                      example_inputs=inputs)
    wrapper = next(m for m in model.modules() if isinstance(m, SiteWrapper))
    keys = set(model.state_dict())
    modules = [n for n, _ in model.named_modules()]
    compiled = torch.compile(model, backend="eager")
    _loss(compiled(*inputs)).backward()
    block = wrapper.compiled_block()
    assert block is wrapper.compiled_block() is not wrapper.wrapped  # built once
    assert set(model.state_dict()) == keys and [n for n, _ in model.named_modules()] == modules
    clone = copy.deepcopy(model)  # compiled code does not travel; rebuilt on first use
    clone_wrapper = next(m for m in clone.modules() if isinstance(m, SiteWrapper))
    assert "_compiled" not in clone_wrapper.__dict__ and "_compiled" in wrapper.__dict__
    assert clone_wrapper.compiled_block() is not clone_wrapper.wrapped
    # without a backend the block runs as it is
    plain = SiteWrapper(nn.Linear(2, 2), wrapper.site, wrapper.mechanism,
                        LaserConfig(compile_backend=None))
    assert plain.compiled_block() is plain.wrapped
