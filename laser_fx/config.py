"""`LaserConfig`: the one frozen, validated configuration of a compression."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .errors import ConfigError

__all__ = ["MODES", "LaserConfig"]

MODES = ("auto", "linear", "checkpoint", "region")
_STORE_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LaserConfig:
    """How the activations of a site are stored.

    Args:
        energy: rank is the smallest k whose basis keeps this fraction of the activation's
            energy (squared Frobenius norm) when the basis is (re)built. ``1.0`` is lossless.
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
        per_site: ``{regex: LaserConfig}`` overrides; the first regex that fully matches a
            site name (``re.fullmatch``) gives that site's config.
        version: config schema version.

    Example::

        cfg = LaserConfig(energy=0.99, per_site={r"net\\..*attn.*": LaserConfig(rank=8)})
    """

    energy: float = 0.99
    rank: int | None = None
    fidelity: float | None = None
    power_iters: int = 1
    oversample: int = 4
    max_rank: int | None = None
    mode: str = "auto"
    min_numel: int = 1024
    store_dtype: torch.dtype | None = None
    per_site: Mapping[str, LaserConfig] = field(default_factory=dict)
    version: int = 1

    def __post_init__(self) -> None:
        def bad(name: str, rule: str, value: object) -> ConfigError:
            return ConfigError(f"`{name}` {rule}, got {value!r}.")

        if not isinstance(self.energy, (int, float)) or not 0.0 < self.energy <= 1.0:
            raise bad("energy", "must be a number in (0, 1]", self.energy)
        if self.fidelity is not None and (
            not isinstance(self.fidelity, (int, float)) or not 0.0 <= self.fidelity <= 1.0
        ):
            raise bad("fidelity", "must be None or a number in [0, 1]", self.fidelity)
        if self.rank is None and self.fidelity is not None and self.fidelity > self.energy:
            raise ConfigError(
                f"`fidelity` ({self.fidelity}) must not exceed `energy` ({self.energy}): a basis "
                "built to keep `energy` would be reset at once. Lower `fidelity` or raise `energy`."
            )
        for name in ("rank", "max_rank"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise bad(name, "must be None or an integer >= 1", v)
        for name in ("power_iters", "oversample", "min_numel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, "must be an integer >= 0", v)
        if self.mode not in MODES:
            raise bad("mode", f"must be one of {MODES}", self.mode)
        if self.store_dtype not in _STORE_DTYPES:
            raise bad("store_dtype", f"must be one of {_STORE_DTYPES}", self.store_dtype)
        if not isinstance(self.per_site, Mapping):
            raise bad("per_site", "must be a mapping {regex: LaserConfig}", self.per_site)
        for pattern, sub in self.per_site.items():
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise bad("per_site", "keys must be valid regular expressions", pattern) from e
            if not isinstance(sub, LaserConfig):
                raise bad("per_site", f"values must be LaserConfig (key {pattern!r})", sub)
            if sub.per_site:
                raise ConfigError(f"`per_site` overrides cannot nest (key {pattern!r}).")
        # Freeze the mapping so that the config stays hashable-by-value in spirit.
        object.__setattr__(self, "per_site", dict(self.per_site))

    def for_site(self, name: str) -> LaserConfig:
        """The config that applies to site ``name`` (first fully matching `per_site` key)."""
        for pattern, sub in self.per_site.items():
            if re.fullmatch(pattern, name):
                return sub
        return self if not self.per_site else dataclasses.replace(self, per_site={})

    def target_rank(self, width: int) -> int | None:
        """Fixed rank for a site of this width, or None when chosen by `energy`."""
        if self.rank is None:
            return None
        return min(self.rank, width, self.max_rank or width)
