"""Gradient error under control: each site's energy chosen to meet a target gradient cosine.

How concentrated a site's activations are varies sharply from site to site (the LASER
paper's finding), so one global ``energy`` is either wasteful or risky. `calibrate` measures
instead: on a micro-batch small enough to run uncompressed, it computes the exact gradient
(every compressed site bypassed), then for each tracker slot alone (an input of a checkpointed
call, a saved tensor of a region, a parameter of a linear site) the lowest energy of a ladder
whose gradient stays within that slot's share of the error budget, then checks all slots
together and raises the energy of the worst one until the target holds. Every evaluation is
one forward and backward on the micro-batch, isolated (buffers, RNG and ``.grad`` untouched).

Error budget: for small errors ``1 - cos ≈ ||δ||² / (2 ||g||²)`` and independent slots' errors
add in squared norm, so each of ``n`` slots gets ``(1 - target) / n``. The micro-batch stands
for the batches that follow: a target met on it is approximate on others
(results/calibration.md measures by how much).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ._isolated import cuda_devices, isolated
from .errors import ConfigError
from .report import compressed_sites
from .wrapper import _StepHook

__all__ = ["DEFAULT_ENERGIES", "Calibration", "SiteCalibration", "calibrate"]

#: energies tried per site, lowest first (1.0: lossless)
DEFAULT_ENERGIES = (0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 1.0)


@dataclass
class SiteCalibration:
    """One site's calibrated energies.

    Attributes:
        name: the site.
        energies: ``{slot: energy}``: per tracker slot (an input of a checkpointed call, a
            saved tensor of a region, a parameter of a linear site).
        cosine: gradient cosine to the exact gradient with only this site compressed, at
            its chosen energies.
        stored_bytes: what the site's calls kept on the micro-batch at those energies.
        dense_bytes: what they would have kept uncompressed.
    """

    name: str
    energies: dict[str, float]
    cosine: float
    stored_bytes: int
    dense_bytes: int


@dataclass
class Calibration:
    """What `calibrate` chose and measured.

    Attributes:
        target: the gradient cosine asked for.
        cosine: gradient cosine with every site at its chosen energies.
        sites: per-site results.
        evaluations: forward+backward runs it took.
        stored_bytes: what all sites kept on the micro-batch at the chosen energies.
    """

    target: float
    cosine: float
    sites: list[SiteCalibration] = field(default_factory=list)
    evaluations: int = 0
    stored_bytes: int = 0

    @property
    def met(self) -> bool:
        return self.cosine >= self.target

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "cosine": self.cosine, "met": self.met,
                "evaluations": self.evaluations, "stored_bytes": self.stored_bytes,
                "sites": [dataclasses.asdict(s) for s in self.sites]}

    def __str__(self) -> str:
        lines = [f"calibrated for gradient cosine >= {self.target} on the micro-batch: "
                 f"{self.cosine:.6f} ({'met' if self.met else 'NOT met'}; "
                 f"{self.evaluations} forward+backward runs; {self.stored_bytes} bytes kept)"]
        for s in self.sites:
            lines.append(f"  {s.name}: energies {s.energies} (alone: cosine {s.cosine:.6f}, "
                         f"{s.stored_bytes} of {s.dense_bytes} bytes)")
        return "\n".join(lines)


def _projection_loss(out: Any) -> Tensor:
    """A fixed random linear function of the float outputs that carry grad (seeded): a
    stand-in for the user's loss that weighs every output element."""
    floats = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()
              and t.requires_grad]
    if not floats:
        raise ConfigError("calibrate: the model returned no float tensor requiring grad; pass "
                          "`loss_fn=lambda output: ...` returning a scalar.")
    gen = torch.Generator().manual_seed(0x1A5E2)
    total = None
    for t in floats:
        r = torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype)
        term = (t * r).float().sum()
        total = term if total is None else total + term
    return total


def _cosine(a: Tensor, b: Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if float(na) == 0.0 and float(nb) == 0.0:
        return 1.0
    return float((a @ b) / (na * nb).clamp_min(1e-30))


def calibrate(
    model: nn.Module,
    example_inputs: Sequence[Any] | Tensor = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    loss_fn: Callable[[Any], Tensor] | None = None,
    target_cosine: float | None = None,
    energies: Sequence[float] = DEFAULT_ENERGIES,
) -> Calibration:
    """Choose each compressed site's energy so that the gradient meets ``target_cosine``.

    The sites of ``model`` (compressed by `compress`) get ``energy=<chosen>`` (``rank`` and
    ``fidelity`` cleared) and fresh trackers. Call it again every K steps to follow the
    model as it trains (``LaserConfig(target_cosine=..., recalibrate_every=K)`` does that on
    the example inputs given to `compress`).

    Args:
        model: a compressed model.
        example_inputs: a micro-batch that fits uncompressed, as the model is called.
        example_kwargs: keyword inputs.
        loss_fn: output -> scalar loss (default: a fixed random projection of the outputs).
        target_cosine: gradient cosine to the exact gradient to reach (default: the sites'
            ``LaserConfig.target_cosine``, else 0.9995).
        energies: the ladder tried per site, lowest first.

    Returns:
        A `Calibration` (also shown by `laser_fx.report`).

    Example::

        laser_fx.compress(model, example_inputs=(x,))
        print(laser_fx.calibrate(model, (x_small,), loss_fn=lambda out: crit(out, y_small)))
    """
    stores = compressed_sites(model) if isinstance(model, nn.Module) else []
    if not stores:
        raise ConfigError("calibrate expects a model compressed by laser_fx.compress.")
    ladder = sorted(float(e) for e in energies)
    if not ladder or not all(0.0 < e <= 1.0 for e in ladder):
        raise ConfigError(f"`energies` must be numbers in (0, 1], got {list(energies)}.")
    if target_cosine is None:
        target_cosine = next((s.config.target_cosine for s in stores
                              if s.config.target_cosine is not None), 0.9995)
    if not 0.0 < target_cosine <= 1.0:
        raise ConfigError(f"`target_cosine` must be in (0, 1], got {target_cosine}.")
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    params = [p for p in model.parameters() if p.requires_grad]
    devices = cuda_devices(tree_leaves((args, kwargs)))
    loss_of = loss_fn or _projection_loss
    result = Calibration(target=target_cosine, cosine=0.0)
    top = ladder[-1]

    def run(energy: dict[tuple[int, str], float] | None) -> Tensor:
        """Gradient with the given (site, slot) energies; None: every site bypassed (exact).
        Sites with no slot listed are bypassed; unlisted slots of a listed site run at the
        top of the ladder."""
        for s in stores:
            mine = {} if energy is None else {k[1]: e for k, e in energy.items() if k[0] == id(s)}
            s.bypass = energy is None or (not mine and any(k[0] != id(s) for k in energy))
            s.slot_energy = {slot: mine.get(slot, top) for slot in slots.get(id(s), ())} | mine
            s.reset()
        with isolated(model, devices=devices), torch.enable_grad():
            torch.manual_seed(0)  # the same dropout masks in every evaluation
            loss = loss_of(model(*args, **kwargs))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        result.evaluations += 1
        return torch.cat([torch.zeros(p.numel(), device=p.device) if g is None
                          else g.detach().flatten().float()
                          for p, g in zip(params, grads, strict=True)])

    slots: dict[int, list[str]] = {}
    chosen: dict[tuple[int, str], float] = {}
    alone: dict[tuple[int, str], float] = {}
    step_hooks = [h for h in model._forward_pre_hooks.values() if isinstance(h, _StepHook)]
    busy = [h.busy for h in step_hooks]
    for h in step_hooks:
        h.busy = True  # these runs are not training steps
    try:
        exact = run(None)
        run({})  # every site at the top of the ladder: creates the trackers, names the slots
        slots = {id(s): s.slots() for s in stores}
        units = [(id(s), slot) for s in stores for slot in slots[id(s)]]
        share = (1.0 - target_cosine) / max(1, len(units))
        for unit in units:
            for e in ladder:
                alone[unit] = _cosine(run({unit: e}), exact)
                if alone[unit] >= 1.0 - share or e == top:
                    chosen[unit] = e
                    break
        while units:
            result.cosine = _cosine(run(dict(chosen)), exact)
            if result.cosine >= target_cosine:
                break
            raisable = [u for u in units if chosen[u] < top]
            if not raisable:
                break
            worst = min(raisable, key=lambda u: alone[u])
            chosen[worst] = ladder[ladder.index(chosen[worst]) + 1]
            alone[worst] = _cosine(run({worst: chosen[worst]}), exact)
        if not units:
            result.cosine = 1.0
        result.stored_bytes = sum(s.stats.total_stored_bytes for s in stores)
        per_site = {}
        for s in stores:  # each site alone at its chosen energies: its cosine and bytes
            mine = {u: e for u, e in chosen.items() if u[0] == id(s)}
            cos = _cosine(run(mine), exact) if mine else 1.0
            per_site[id(s)] = SiteCalibration(
                s.site.name, {u[1]: e for u, e in mine.items()}, cos,
                s.stats.total_stored_bytes, s.stats.uncompressed_bytes)
    finally:
        for h, was in zip(step_hooks, busy, strict=True):
            h.busy = was
        for s in stores:
            s.bypass = False
            s.slot_energy = {u[1]: e for u, e in chosen.items() if u[0] == id(s)} or None
            s.reset()
    for s in stores:
        s.calibration = per_site[id(s)]
        result.sites.append(s.calibration)
    return result
