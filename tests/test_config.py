"""Tests of `LaserConfig`: validation names the field, per-site resolution, frozen, target_rank."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from laser_fx import ConfigError, LaserConfig
from laser_fx.config import MODES

_BAD = [
    ("energy", 0.0, "must be a number in \\(0, 1\\]"),
    ("energy", 1.5, "must be a number in \\(0, 1\\]"),
    ("energy", float("nan"), "must be a number in \\(0, 1\\]"),
    ("energy", "0.9", "must be a number"),
    ("energy", True, "must be a number"),
    ("energy", None, "must be a number"),
    ("fidelity", -0.1, "must be None or a number in \\[0, 1\\]"),
    ("fidelity", 1.01, "must be None or a number in \\[0, 1\\]"),
    ("fidelity", float("nan"), "must be None or a number"),
    ("fidelity", "high", "must be None or a number"),
    ("rank", 0, "must be None or an integer >= 1"),
    ("rank", 2.0, "must be None or an integer >= 1"),
    ("rank", True, "must be None or an integer >= 1"),
    ("max_rank", -3, "must be None or an integer >= 1"),
    ("max_rank", "8", "must be None or an integer >= 1"),
    ("power_iters", -1, "must be an integer >= 0"),
    ("power_iters", None, "must be an integer >= 0"),
    ("oversample", 1.5, "must be an integer >= 0"),
    ("min_numel", -5, "must be an integer >= 0"),
    ("min_numel", False, "must be an integer >= 0"),
    ("mode", "lowrank", "must be one of"),
    ("mode", None, "must be one of"),
    ("store_dtype", torch.float64, "must be one of"),
    ("store_dtype", "float16", "must be one of"),
    ("center", 1, "must be True or False"),
    ("center", None, "must be True or False"),
    ("per_site", ["net.*"], "must be a mapping"),
    ("per_site", {"net.(": LaserConfig()}, "keys must be valid regular expressions"),
    ("per_site", {3: LaserConfig()}, "keys must be regular expressions \\(str\\)"),
    ("per_site", {"net.*": {"rank": 4}}, "values must be LaserConfig"),
    ("compile_backend", "", "must be None or a torch.compile backend name"),
    ("compile_backend", 3, "must be None or a torch.compile backend name"),
    ("version", 2, "must be 1"),
    ("version", 0, "must be an integer >= 1"),
]


@pytest.mark.parametrize(
    "field, value, rule", _BAD, ids=[f"{f}={v!r}" for f, v, _ in _BAD]
)
def test_invalid_field_is_a_config_error_naming_the_field(field, value, rule):
    with pytest.raises(ConfigError, match=f"`{field}` {rule}"):
        LaserConfig(**{field: value})


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        LaserConfig(energy=2.0)


def test_fidelity_above_energy_is_rejected_only_without_rank():
    exceed = r"`fidelity` \(0.99\) must not exceed `energy` \(0.9\)"
    with pytest.raises(ConfigError, match=exceed):
        LaserConfig(energy=0.9, fidelity=0.99)
    # with a fixed rank the energy target is unused, so the pair is fine
    assert LaserConfig(energy=0.9, fidelity=0.99, rank=4).fidelity == 0.99
    assert LaserConfig(energy=0.9, fidelity=0.9).fidelity == 0.9
    assert LaserConfig(energy=0.9, fidelity=None).fidelity is None


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_accepted(mode):
    assert LaserConfig(mode=mode).mode == mode


def test_numpy_integers_become_ints():
    cfg = LaserConfig(rank=np.int64(3), max_rank=np.int32(5))
    assert (cfg.rank, cfg.max_rank) == (3, 5)
    assert type(cfg.rank) is int and type(cfg.max_rank) is int


def test_frozen_hashable_copyable():
    cfg = LaserConfig(rank=4, per_site={"a": LaserConfig(rank=2)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 8  # type: ignore[misc]
    assert hash(cfg) == hash(LaserConfig(rank=4, per_site={"a": LaserConfig(rank=2)}))
    assert copy.deepcopy(cfg) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_per_site_is_a_private_copy():
    overrides = {"a": LaserConfig(rank=2)}
    cfg = LaserConfig(per_site=overrides)
    overrides["b"] = LaserConfig(rank=3)
    assert list(cfg.per_site) == ["a"]


def test_nested_per_site_is_rejected():
    inner = LaserConfig(per_site={"x": LaserConfig(rank=2)})
    nest = r"`per_site` overrides cannot nest \(key 'net\.\*' has its own `per_site`\)"
    with pytest.raises(ConfigError, match=nest):
        LaserConfig(per_site={"net.*": inner})


_OVERRIDES = {
    r"net\.blocks\.0\..*": LaserConfig(rank=2),
    r"net\..*\.mlp\..*": LaserConfig(rank=3),  # also matches block 0's mlp: first wins
    r"net": LaserConfig(mode="checkpoint"),
}
_FOR_SITE = [
    ("net.blocks.0.mlp.gate", "rank", 2),
    ("net.blocks.1.mlp.gate", "rank", 3),
    ("net.blocks.1.mix.q", "rank", None),  # no key matches: the outer config
    ("net", "mode", "checkpoint"),
    ("net.blocks", "mode", "linear"),  # fullmatch, not search: `net` does not match it
    ("xnet.blocks.0.mlp", "rank", None),
]


@pytest.mark.parametrize("site, attr, want", _FOR_SITE, ids=[s for s, _, _ in _FOR_SITE])
def test_for_site_first_fullmatch_wins(site, attr, want):
    cfg = LaserConfig(mode="linear", energy=0.9, fidelity=0.8, per_site=_OVERRIDES)
    got = cfg.for_site(site)
    assert getattr(got, attr) == want
    assert got.per_site == {}
    if not any(re.fullmatch(p, site) for p in _OVERRIDES):
        # the outer config, without its overrides
        assert dataclasses.replace(got, per_site=cfg.per_site) == cfg


def test_for_site_without_overrides_is_self():
    cfg = LaserConfig(rank=4)
    assert cfg.for_site("anything") is cfg


@given(
    rank=st.one_of(st.none(), st.integers(1, 64)),
    max_rank=st.one_of(st.none(), st.integers(1, 64)),
    width=st.integers(1, 128),
)
def test_target_rank(rank, max_rank, width):
    got = LaserConfig(rank=rank, max_rank=max_rank).target_rank(width)
    if rank is None:
        assert got is None
    else:
        assert got == min(rank, width, max_rank or width)
        assert 1 <= got <= width


@pytest.mark.parametrize("width", [0, -2, 2.5, None, True])
def test_target_rank_rejects_bad_widths(width):
    with pytest.raises(ConfigError, match="`width` must be an integer >= 1"):
        LaserConfig(rank=4).target_rank(width)
