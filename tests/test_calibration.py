"""`laser_fx.calibrate` / `LaserConfig(target_cosine=...)`: per-slot energies meeting a target."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import laser_fx
from laser_fx import ConfigError, LaserConfig
from laser_fx.calibration import _projection_loss


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h, x):
        return F.rms_norm(h + self.b(torch.tanh(self.a(h + x))), (h.shape[-1],))


class _TwoBlocks(nn.Module):
    """Two recursions; the second one's contribution to the output is scaled down, so the
    gradient tolerates much more error in its stored inputs."""

    def __init__(self, d: int = 32, n: int = 3, quiet: float = 0.02) -> None:
        super().__init__()
        self.n, self.quiet = n, quiet
        self.loud, self.soft = _Block(d), _Block(d)

    def forward(self, x):
        h, g = torch.zeros_like(x), torch.zeros_like(x)
        for _ in range(self.n):
            h = self.loud(h, x)
            g = self.soft(g, x)
        return h + self.quiet * g


def _data(d: int = 32, rows: int = 256, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # a decaying spectrum: low energies keep a few directions, high ones many
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen)).Q
    scale = torch.logspace(0, -2.5, d)
    return ((torch.randn(rows, d, generator=gen) * scale) @ basis.T).reshape(8, rows // 8, d)


def _cosine(model, ref, x) -> float:
    grads = []
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
        _projection_loss(m(x)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    return F.cosine_similarity(grads[0], grads[1], dim=0).item()


def _stored(model, x) -> int:
    model(x)
    return laser_fx.report(model).totals()["stored_bytes"]


@pytest.fixture
def pair():
    torch.manual_seed(0)
    model = _TwoBlocks()
    return model, copy.deepcopy(model), _data()


def test_calibration_meets_its_target_and_a_fresh_check_agrees(pair):
    model, ref, x = pair
    laser_fx.compress(model, example_inputs=(x,), config=LaserConfig(min_numel=0))
    cal = laser_fx.calibrate(model, (x,), target_cosine=0.999)
    assert cal.met and cal.cosine >= 0.999, str(cal)
    assert _cosine(model, ref, x) >= 0.999  # measured again, outside calibrate
    rows = {r["name"]: r for r in laser_fx.report(model).to_dict()["sites"]}
    assert set(rows) == {"loud", "soft"}
    assert all(r["calibrated_cosine"] is not None and r["energies"] for r in rows.values())
    assert "calibrated energies" in str(laser_fx.report(model))


def test_calibration_keeps_fewer_bytes_than_the_smallest_single_energy_meeting_the_target(pair):
    model, ref, x = pair
    target = 0.999
    singles = {}
    for e in (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 1.0):
        m = copy.deepcopy(ref)
        laser_fx.compress(m, example_inputs=(x,), config=LaserConfig(energy=e, min_numel=0))
        if _cosine(m, ref, x) >= target:
            singles[e] = _stored(m, x)
            break
    (e_single, single_bytes), = singles.items()
    laser_fx.compress(model, example_inputs=(x,), config=LaserConfig(min_numel=0))
    laser_fx.calibrate(model, (x,), target_cosine=target)
    energies = {r["name"]: r["energies"] for r in laser_fx.report(model).to_dict()["sites"]}
    assert min(energies["soft"].values()) < e_single, (energies, e_single)
    assert _stored(model, x) < single_bytes, (energies, e_single)


def test_target_cosine_in_the_config_calibrates_at_compress_and_again_every_k_steps(pair):
    model, ref, x = pair
    cfg = LaserConfig(min_numel=0, target_cosine=0.999, recalibrate_every=2)
    laser_fx.compress(model, example_inputs=(x,), config=cfg)
    first = model.loud.calibration
    assert first is not None and model.soft.calibration is not None
    model(x)  # step 1: no recalibration
    assert model.loud.calibration is first
    model(x)  # step 2: recalibrated before the forward
    assert model.loud.calibration is not first
    with torch.no_grad():
        model(x)  # evaluation forwards do not count
    assert _cosine(model, ref, x) >= 0.999


def test_a_failing_loss_leaves_the_sites_compressing_as_before(pair):
    model, ref, x = pair
    laser_fx.compress(model, example_inputs=(x,), config=LaserConfig(min_numel=0))

    def bad(out):
        raise RuntimeError("user loss failed")

    with pytest.raises(RuntimeError, match="user loss failed"):
        laser_fx.calibrate(model, (x,), loss_fn=bad)
    assert not model.loud.bypass and not model.soft.bypass
    model(x).sum().backward()
    assert laser_fx.report(model).to_dict()["sites"][0]["calls"] == 3


@pytest.mark.parametrize(("kw", "match"), [
    ({"target_cosine": 0.0}, "target_cosine"),
    ({"target_cosine": 1.5}, "target_cosine"),
    ({"recalibrate_every": 3}, "needs `target_cosine`"),
    ({"target_cosine": 0.99, "recalibrate_every": 0}, "recalibrate_every"),
])
def test_bad_calibration_config_is_a_clear_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        LaserConfig(**kw)


def test_calibrate_needs_a_compressed_model_and_a_sane_ladder(pair):
    model, _, x = pair
    with pytest.raises(ConfigError, match="compressed"):
        laser_fx.calibrate(model, (x,))
    laser_fx.compress(model, example_inputs=(x,))
    with pytest.raises(ConfigError, match="energies"):
        laser_fx.calibrate(model, (x,), energies=[0.0, 2.0])
