"""Compressed models on a GPU: trackers live on the device of the activations they store,
whether the model was compressed there or compressed on the CPU and moved with ``.to()``
(trackers are not submodules: each follows its activations on its next call). Skipped where
no CUDA device is present (CI); run on a GPU machine with ``pytest tests/test_cuda.py``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import laser_fx
from laser_fx import LaserConfig
from laser_fx.testing.zoo import ZOO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = [("trm_attn", m) for m in ("auto", "linear", "region", "checkpoint")] + [
    ("looped_transformer", "auto"), ("unrolled_rnn", "linear")]


def _loss(out):
    return out.float().cumsum(-1).pow(2).mean()


def _cuda(tree):
    return tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in tree)


def _params(m: nn.Module) -> list[torch.Tensor]:
    return [p for p in m.parameters() if p.requires_grad]


def _trackers(cmodel: nn.Module) -> list[laser_fx.SubspaceTracker]:
    return [t for m in cmodel.modules() if isinstance(m, laser_fx.SiteWrapper)
            for t in m.trackers.values()]


def _trackers_on(cmodel: nn.Module, device: str) -> bool:
    trackers = _trackers(cmodel)
    return bool(trackers) and all(b.device.type == device for t in trackers for b in t.buffers())


@pytest.mark.parametrize(("name", "mode"), CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_compress_a_cuda_model_lossless(name, mode):
    model, inputs = ZOO[name]()
    model, inputs = model.cuda(), _cuda(inputs)
    cmodel = laser_fx.compress(copy.deepcopy(model), example_inputs=inputs,
                               config=LaserConfig(energy=1.0, mode=mode, min_numel=0))
    for _ in range(2):
        got = torch.autograd.grad(_loss(cmodel(*inputs)), _params(cmodel))
        want = torch.autograd.grad(_loss(model(*inputs)), _params(model))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)
    assert _trackers_on(cmodel, "cuda")


def test_compress_on_cpu_then_move_and_load_a_cpu_state():
    model, inputs = ZOO["trm_attn"]()
    cmodel = laser_fx.compress(model, example_inputs=inputs)
    assert cmodel is model
    _loss(cmodel(*inputs)).backward()  # warm trackers, on the CPU
    assert _trackers_on(cmodel, "cpu")
    cmodel.cuda()
    gpu_inputs = _cuda(inputs)
    _loss(cmodel(*gpu_inputs)).backward()  # the warm trackers follow the activations
    assert _trackers_on(cmodel, "cuda")
    # a CPU state dict (the user's keys) loads strictly into a GPU compressed model ...
    state = {k: v.cpu() for k, v in cmodel.state_dict().items()}
    other = laser_fx.compress(ZOO["trm_attn"](seed=1)[0], example_inputs=inputs).cuda()
    other.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(other(*gpu_inputs), cmodel(*gpu_inputs), rtol=1e-5, atol=1e-6)
    # ... and into an uncompressed CPU model, which then computes the same on the CPU
    plain = ZOO["trm_attn"](seed=2)[0]
    plain.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(plain(*inputs), cmodel(*gpu_inputs).cpu(), rtol=1e-4,
                                   atol=1e-5)
    laser_fx.strip(cmodel)  # the original modules come back, still on the GPU
    assert not laser_fx.is_compressed(cmodel)
    assert all(p.is_cuda for p in cmodel.parameters())


def test_a_borrowed_cuda_activation_is_decided_late_from_a_copy():
    # on an accelerator `compress(borrowed=True)` keeps the decision for the next call and
    # a copy of x for it: overwriting x must not change any record
    cfg = LaserConfig(energy=0.999, min_numel=0)
    kept = laser_fx.SubspaceTracker(32, cfg).cuda()
    borrowed = laser_fx.SubspaceTracker(32, cfg).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 4, device="cuda", generator=g)).Q
    records = []
    for _ in range(6):
        x = torch.randn(256, 4, device="cuda", generator=g) @ basis.T
        x = x + 0.05 * torch.randn(256, 32, device="cuda", generator=g)
        records.append((kept.compress(x.clone()), borrowed.compress(x, borrowed=True)))
        assert borrowed._pending is None or borrowed._pending.x.data_ptr() != x.data_ptr()
        x.fill_(float("nan"))
    for a, b in records:
        torch.testing.assert_close(borrowed.decompress(b), kept.decompress(a))


def _backward_grads(model: nn.Module, out: torch.Tensor) -> list[torch.Tensor]:
    # loss.backward(): a traced checkpoint adds its parameter gradients to .grad, and
    # torch.autograd.grad raises for it (README, limitations)
    model.zero_grad(set_to_none=True)
    _loss(out).backward()
    return [p.grad for p in _params(model)]


def _flat(gs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten().double() for g in gs])


@pytest.mark.parametrize("mode", ["auto", "linear"])
def test_fullgraph_compile_on_cuda_matches_eager(mode):
    # lossless (energy 1.0): the compiled model's gradients are the eager one's; lossy (the
    # default): inductor's kernels round differently than eager ones, which can tip a rank
    # decision (H200, torch 2.11, linear mode: 1.2e-4 apart), so both are compared with the
    # exact gradient at the default energy's tolerance
    model, inputs = ZOO["trm_attn"]()
    model, inputs = model.cuda(), _cuda(inputs)
    for energy in (1.0, LaserConfig().energy):
        config = LaserConfig(mode=mode, energy=energy)
        eager = laser_fx.compress(copy.deepcopy(model), example_inputs=inputs, config=config)
        comp = laser_fx.compress(copy.deepcopy(model), example_inputs=inputs, config=config)
        compiled = torch.compile(comp, fullgraph=True)
        exact = _flat(_backward_grads(model, model(*inputs)))
        for _ in range(2):
            got = _backward_grads(comp, compiled(*inputs))
            want = _backward_grads(eager, eager(*inputs))
            if energy == 1.0:
                for g, w in zip(got, want, strict=True):
                    torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)
            for gs in (got, want):
                cos = torch.nn.functional.cosine_similarity(_flat(gs), exact, dim=0)
                assert cos > 0.999, (energy, float(cos))


def _syncs(fn) -> int:
    """How many operations in ``fn()`` made the host wait for the device (sync debug mode)."""
    from benchmarks._common import host_syncs

    with host_syncs("cuda") as found:
        fn()
    return sum(found.values())


def test_small_eigendecompositions_run_on_the_host_and_agree_with_the_device():
    from laser_fx import _linalg

    g = torch.Generator(device="cuda").manual_seed(0)
    for k in (1, 7, 64, _linalg._HOST_EIG_MAX):
        a = torch.randn(512, k, device="cuda", dtype=torch.float64, generator=g)
        gram = a.T @ a
        vals, vecs = _linalg.sym_eig_desc(gram)
        assert vals.device.type == "cpu" and vecs.device.type == "cuda"
        want, _ = torch.linalg.eigh(gram)
        torch.testing.assert_close(vals, want.flip(0).clamp_min(0).cpu())
        torch.testing.assert_close(vecs @ torch.diag(vals.cuda()) @ vecs.T, gram)


def test_steady_state_and_refinements_never_wait_for_the_device():
    # a decision reads energies copied asynchronously one call earlier; a power update's
    # Ritz step reads its small Gram matrix one call later the same way; only deciding
    # everything at once (settle, as a test or the end of a step may) waits
    tracker = laser_fx.SubspaceTracker(64, LaserConfig(energy=0.99, min_numel=0)).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    bases = [torch.linalg.qr(torch.randn(64, 6, device="cuda", generator=g)).Q
             for _ in range(2)]

    def x(sub: int) -> torch.Tensor:
        return torch.randn(2048, 6, device="cuda", generator=g) @ bases[sub].T

    for _ in range(3):
        tracker.compress(x(0))
    tracker.settle()
    resets, updates = tracker.resets, tracker.power_updates
    assert _syncs(lambda: [tracker.compress(x(0)) for _ in range(5)]) == 0
    assert _syncs(lambda: [tracker.compress(x(i // 2 % 2)) for i in range(2, 10)]) == 0
    assert tracker.power_updates >= updates + 3 and tracker.resets == resets
    tracker.compress(x(1))
    tracker.compress(x(0))  # decided, and refined, at the next call or at settle
    assert _syncs(tracker.settle) <= 1


def test_the_forward_end_waits_on_copies_not_on_reads():
    # the end of a forward decides each tracker's last call (`end_forward`, on every tracker
    # first): a refinement queues its power iteration and the copy of its Gram matrix, and
    # `settle` takes the Ritz steps from the copies (event waits): no synchronising read,
    # where deciding at once (`settle` alone) reads the Gram matrix of each refining tracker
    g = torch.Generator(device="cuda").manual_seed(0)
    bases = [torch.linalg.qr(torch.randn(64, 4, device="cuda", generator=g)).Q
             for _ in range(2)]

    def x(sub: int) -> torch.Tensor:
        return torch.randn(2048, 4, device="cuda", generator=g) @ bases[sub].T

    def last_calls_falling_short() -> list[laser_fx.SubspaceTracker]:
        trackers = [laser_fx.SubspaceTracker(64, LaserConfig(energy=0.99, min_numel=0)).cuda()
                    for _ in range(2)]
        for t in trackers:
            t.compress(x(0))
            t.compress(x(0))
            t.settle()
            t.compress(x(1))  # another subspace: the decision about this call refines
        return trackers

    trackers = last_calls_falling_short()

    def forward_end() -> None:
        for t in trackers:
            t.end_forward()
        for t in trackers:
            t.settle()

    assert _syncs(forward_end) == 0
    assert all(t.power_updates == 1 and t.resets == 1 and t._ritz is None
               and t._pending is None for t in trackers)
    at_once = last_calls_falling_short()
    assert _syncs(lambda: [t.settle() for t in at_once]) >= len(at_once)
