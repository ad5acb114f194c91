"""`LaserConfig`: the one frozen, validated configuration of a compression."""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .errors import ConfigError

__all__ = ["GRANULARITIES", "MODES", "LaserConfig"]

MODES = ("auto", "linear", "checkpoint", "region")
GRANULARITIES = ("auto", "block", "layer", "sublayer")
_STORE_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)
_VERSION = 1


def _bad(name: str, rule: str, value: object) -> ConfigError:
    return ConfigError(f"`{name}` {rule}, got {value!r}.")


def _is_real(v: object) -> bool:
    # bool is an int subclass, but `energy=True` is a slip, not 1.0
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class LaserConfig:
    """How the activations of a site are stored.

    Args:
        energy: rank is the smallest k whose basis keeps this fraction of the activation's
            energy (squared Frobenius norm) when the basis is (re)built. ``1.0`` is lossless.
            The default 0.999 loses at most ~3% of a stored tensor's norm; 0.99 (~10%) keeps
            fewer bytes but gave a D=512 ``mlp_t`` TRM gradient cosine 0.93 (0.998 at 0.999)
            and a 6x6 Sudoku TRM up to 15 points of accuracy in single seeds
            (results/trm_energy099/, results/trm_runs_session2.jsonl; README, TRM example).
        rank: fixed rank k; overrides ``energy`` when set.
        fidelity: reset trigger. When the current basis captures less than this fraction of a
            new activation's energy, the tracker runs power iterations and, if that is not
            enough, rebuilds the basis. Must not exceed ``energy``. None (default): equal to
            ``energy``, so every stored activation keeps at least ``energy`` of its energy
            (``energy=1.0`` is then lossless); with a fixed ``rank``, None means 98% of the
            fidelity the last reset reached.
        power_iters: warm-started block power iterations tried before a reset (0: reset at once).
        oversample: extra columns used by power iterations and randomized SVD.
        max_rank: cap on k (None: no cap beyond the width).
        mode: mechanism: ``"linear"`` (compressed linear inputs), ``"checkpoint"`` (a shared
            block's call keeps only its inputs, low-rank, and is recomputed in backward),
            ``"region"`` (activation-shaped tensors saved inside a block call are stored
            low-rank), or ``"auto"``.
        min_numel: tensors with fewer elements are stored as they are.
        store_dtype: dtype of stored coefficients (None: the activation's dtype).
        center: take each activation's row mean out before projecting and store it exactly
            (one extra row per record), so ``energy`` is measured on what varies between
            rows. A component every token shares (a bias, a constant carry, softmax
            statistics) otherwise counts as "captured" and the rows' differences are what is
            dropped: storing every saved tensor of a TRM block at 99% energy gave gradient
            cosine 0.98 uncentered and 0.997 centered (tests/ops/test_region.py).
            False: plain ``X ≈ C Qᵀ``.
        granularity: what one compressed checkpoint covers in a shared block (mechanism
            ``"checkpoint"``): ``"block"`` (each call of the block), ``"layer"`` (each call of
            the modules the block calls, e.g. its transformer layers), ``"sublayer"`` (the
            modules those call, e.g. attention and MLP branches), or ``"auto"``: the level
            with the smallest estimated peak (stored checkpoints of every grad-enabled call
            plus the re-run of the largest unit), from the probe run's measured bytes
            (`laser_fx.granularity`). Finer units re-run less in backward and store more
            inputs, which is the part LASER compresses.
        target_cosine: gradient error under control instead of one global ``energy``: when
            set, `compress` calibrates each site's energy on its example inputs (a micro-batch
            that fits uncompressed) so that the gradient's cosine to the exact one is at
            least this (`laser_fx.calibrate`); ``energy`` is then only the starting point.
        recalibrate_every: with ``target_cosine``, calibrate again every this many training
            forwards (on the example inputs given to `compress`), as the model trains.
        compile_backend: when the model runs under ``torch.compile``, the backend a
            checkpointed block is compiled with on its own, for its re-run and backward (a
            traced call's forward is part of the model's graph, `laser_fx.ops.traced`; an
            opaque call's forward runs it too), and a ``"region"`` call's block; None runs
            them eagerly. Mechanism ``"linear"`` re-runs nothing: its linear ops are traced
            into the model's graph (`laser_fx.ops.traced_linear`).
        per_site: ``{regex: LaserConfig}`` overrides; the first regex that fully matches a
            site name (``re.fullmatch``) gives that site's whole config (fields are not
            inherited from the outer config); overrides cannot nest.
        version: config schema version (1).

    Example::

        cfg = LaserConfig(energy=0.99, per_site={r"net\\..*attn.*": LaserConfig(rank=8)})
    """

    energy: float = 0.999
    rank: int | None = None
    fidelity: float | None = None
    power_iters: int = 1
    oversample: int = 4
    max_rank: int | None = None
    mode: str = "auto"
    min_numel: int = 1024
    store_dtype: torch.dtype | None = None
    center: bool = True
    granularity: str = "auto"
    target_cosine: float | None = None
    recalibrate_every: int | None = None
    compile_backend: str | None = "inductor"
    # hash=False: a dict is unhashable; equal configs still hash equal without it
    per_site: Mapping[str, LaserConfig] = field(default_factory=dict, hash=False)
    version: int = 1

    def __post_init__(self) -> None:
        if not _is_real(self.energy) or not 0.0 < self.energy <= 1.0:  # NaN fails too
            raise _bad("energy", "must be a number in (0, 1]", self.energy)
        if self.fidelity is not None and (
            not _is_real(self.fidelity) or not 0.0 <= self.fidelity <= 1.0
        ):
            raise _bad("fidelity", "must be None or a number in [0, 1]", self.fidelity)
        if self.rank is None and self.fidelity is not None and self.fidelity > self.energy:
            raise ConfigError(
                f"`fidelity` ({self.fidelity}) must not exceed `energy` ({self.energy}): a basis "
                "built to keep `energy` would be reset at once. Lower `fidelity` or raise `energy`."
            )
        for name, low in (("rank", 1), ("max_rank", 1), ("power_iters", 0), ("oversample", 0),
                          ("min_numel", 0), ("version", 1)):
            v = getattr(self, name)
            if v is None and name in ("rank", "max_rank"):
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                optional = "None or " if name in ("rank", "max_rank") else ""
                raise _bad(name, f"must be {optional}an integer >= {low}", v)
            object.__setattr__(self, name, int(v))  # numpy integers become plain ints
        if self.version != _VERSION:
            raise _bad("version", f"must be {_VERSION} (the schema this laser_fx reads)",
                       self.version)
        if self.mode not in MODES:
            raise _bad("mode", f"must be one of {MODES}", self.mode)
        if self.target_cosine is not None and (
            not _is_real(self.target_cosine) or not 0.0 < self.target_cosine <= 1.0
        ):
            raise _bad("target_cosine", "must be None or a number in (0, 1]", self.target_cosine)
        if self.recalibrate_every is not None:
            if (isinstance(self.recalibrate_every, bool)
                    or not isinstance(self.recalibrate_every, numbers.Integral)
                    or self.recalibrate_every < 1):
                raise _bad("recalibrate_every", "must be None or an integer >= 1",
                           self.recalibrate_every)
            if self.target_cosine is None:
                raise ConfigError("`recalibrate_every` needs `target_cosine` (what to calibrate "
                                  "for); set both, or neither.")
        if self.compile_backend is not None and (
                not isinstance(self.compile_backend, str) or not self.compile_backend):
            raise _bad("compile_backend", "must be None or a torch.compile backend name",
                       self.compile_backend)
        if self.granularity not in GRANULARITIES:
            raise _bad("granularity", f"must be one of {GRANULARITIES}", self.granularity)
        if self.store_dtype not in _STORE_DTYPES:
            raise _bad("store_dtype", f"must be one of {_STORE_DTYPES}", self.store_dtype)
        if not isinstance(self.center, bool):
            raise _bad("center", "must be True or False", self.center)
        if not isinstance(self.per_site, Mapping):
            raise _bad("per_site", "must be a mapping {regex: LaserConfig}", self.per_site)
        for pattern, sub in self.per_site.items():
            if not isinstance(pattern, str):
                raise _bad("per_site", "keys must be regular expressions (str)", pattern)
            try:
                re.compile(pattern)
            except re.error as e:
                raise _bad("per_site", f"keys must be valid regular expressions ({e})",
                           pattern) from e
            if not isinstance(sub, LaserConfig):
                raise _bad("per_site", f"values must be LaserConfig (key {pattern!r})", sub)
            if sub.per_site:
                raise ConfigError(
                    f"`per_site` overrides cannot nest (key {pattern!r} has its own `per_site`); "
                    "list every pattern in the top-level config."
                )
        # A private copy: mutating the caller's dict later must not change this config.
        object.__setattr__(self, "per_site", dict(self.per_site))

    def for_site(self, name: str) -> LaserConfig:
        """The config that applies to site ``name``.

        Args:
            name: a site name (`Site.name`).

        Returns:
            The override of the first `per_site` key (in insertion order) that fully matches
            ``name`` (``re.fullmatch``), used as it is (its fields do not inherit this
            config's); otherwise this config without `per_site`.
        """
        for pattern, sub in self.per_site.items():
            if re.fullmatch(pattern, name):
                return sub
        return self if not self.per_site else dataclasses.replace(self, per_site={})

    def target_rank(self, width: int) -> int | None:
        """Fixed rank for a site of this width, or None when chosen by `energy`.

        Args:
            width: feature width of the site's activation (>= 1).

        Returns:
            ``min(rank, width, max_rank)`` when ``rank`` is set, else None.
        """
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
            raise ConfigError(f"`width` must be an integer >= 1, got {width!r}.")
        if self.rank is None:
            return None
        return min(self.rank, width, self.max_rank or width)
