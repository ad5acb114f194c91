"""What one compressed checkpoint covers inside a shared block: the block, its layers, or theirs.

Checkpointing keeps the inputs of every grad-enabled call of a unit and, in backward, re-runs
one unit at a time, so the peak is about

    peak(level) = stored(level) + rerun(level)

* ``stored``: the inputs of every unit call, plus what the block saves OUTSIDE its units (a
  norm between two checkpointed branches keeps its input as usual);
* ``rerun``: what the largest unit call saves when it is re-run in backward.

Finer units re-run less and store more inputs, and the stored inputs are what LASER
compresses. The probe run measured every term (`Use.nbytes`: bytes autograd saved in a call;
`Use.input_bytes`: its inputs), so `plan_granularity` estimates each level's peak with inputs
stored dense — the worst case for LASER, exactly torch checkpoint's case — and picks the
smallest. LASER never keeps more than that estimate for the same units (a record is stored
low-rank only when smaller), so the chosen level also bounds what a user could reach by
placing torch checkpoints by hand at block, layer or sublayer level.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .sites import Site

__all__ = ["LEVELS", "Level", "levels", "plan_granularity"]

LEVELS = ("block", "layer", "sublayer")


@dataclass(frozen=True)
class Level:
    """One way to checkpoint a block, with its estimated bytes.

    Attributes:
        name: ``"block"``, ``"layer"`` or ``"sublayer"``.
        units: the sites checkpointed at this level.
        stored: bytes kept after the forward by all grad-enabled calls (inputs dense).
        rerun: bytes saved by the largest unit call when re-run in backward.
    """

    name: str
    units: tuple[Site, ...]
    stored: int
    rerun: int

    @property
    def peak(self) -> int:
        return self.stored + self.rerun


def _grad(site: Site, attr: str) -> list[int]:
    return [int(getattr(u, attr) or 0) for u in site.uses if u.grad_enabled]


def _level(name: str, block: Site, units: list[Site]) -> Level:
    block_saved = sum(_grad(block, "nbytes"))
    inside = sum(sum(_grad(u, "nbytes")) for u in units)
    outside = max(0, block_saved - inside) if units != [block] else 0
    stored = sum(sum(_grad(u, "input_bytes")) for u in units) + outside
    rerun = max((b for u in units for b in _grad(u, "nbytes")), default=0)
    return Level(name, tuple(units), stored, rerun)


def levels(block: Site, sites: list[Site]) -> list[Level]:
    """The block's levels that exist: the block, its layers, their sublayers.

    A layer without sublayers stands for itself at the sublayer level. A level that is the
    same set of units as the one above it is left out.
    """
    children: dict[str, list[Site]] = {}
    for s in sites:
        if s.parent is not None and s.param is None and s.grad_uses >= 2:
            children.setdefault(s.parent, []).append(s)
    out = [_level("block", block, [block])]
    layer = children.get(block.name, [])
    if layer:
        out.append(_level("layer", block, layer))
        sub = [c for u in layer for c in (children.get(u.name) or [u])]
        if [u.name for u in sub] != [u.name for u in layer]:
            out.append(_level("sublayer", block, sub))
    return out


def plan_granularity(block: Site, sites: list[Site], granularity: str) -> tuple[Level, list[Level]]:
    """The level to checkpoint ``block`` at, and every level's estimate.

    Args:
        block: a top-level module site.
        sites: every site of the probe run (for the block's layers and sublayers).
        granularity: ``"auto"`` (smallest estimated peak; the coarser level on a tie),
            ``"block"``, ``"layer"`` or ``"sublayer"`` (the finest level that exists up to it).
    """
    options = levels(block, sites)
    if granularity == "auto":
        return min(options, key=lambda lv: (lv.peak, LEVELS.index(lv.name))), options
    if granularity not in LEVELS:
        raise ConfigError(f"`granularity` must be 'auto' or one of {LEVELS}, got {granularity!r}.")
    want = LEVELS.index(granularity)
    return [lv for lv in options if LEVELS.index(lv.name) <= want][-1], options
