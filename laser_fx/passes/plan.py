"""Analysis pass: which sites to compress, and by which mechanism.

`plan_sites` resolves the user's ``sites``/``exclude`` selectors against the found sites and
picks a mechanism per site from the site's config (`LaserConfig.for_site`):

* module sites (the shared block) take ``"region"`` or ``"checkpoint"``; ``mode="auto"``
  takes `AUTO_BLOCK_MODE`, chosen from the measurements in the README;
* op sites take ``"linear"`` (linears and ``X @ W`` matmuls), unless their block is already
  compressed as a whole; a module site whose mode is ``"linear"`` hands its ops the linear
  mechanism.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch.fx import GraphModule

from ..config import LaserConfig
from ..errors import ConfigError, NoSitesError
from . import PassResult
from .find_sites import Site

__all__ = ["AUTO_BLOCK_MODE", "Plan", "SiteSelector", "plan_sites", "select"]

#: mechanism ``mode="auto"`` gives a module site (see README, "Choosing a mechanism")
AUTO_BLOCK_MODE = "checkpoint"
_BLOCK_MODES = ("region", "checkpoint")

SiteSelector = str | Sequence[str] | Callable[[Site], bool]


@dataclass
class Plan:
    """Chosen sites: name -> (site, mechanism, config), plus sites left alone and why."""

    chosen: dict[str, tuple[Site, str, LaserConfig]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def select(sites: list[Site], spec: SiteSelector | None, what: str) -> list[Site]:
    """Sites matching ``spec`` (``"auto"``, names, a regex, or a callable); `ConfigError` when a
    name or regex matches nothing."""
    names = [s.name for s in sites]
    if spec is None:
        return []
    if isinstance(spec, str) and spec == "auto":
        return list(sites)
    if callable(spec) and not isinstance(spec, str):
        return [s for s in sites if spec(s)]
    if isinstance(spec, str):
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise ConfigError(f"`{what}` regex {spec!r} is invalid: {e}.") from e
        hit = [s for s in sites if rx.fullmatch(s.name)]
        if not hit:
            raise ConfigError(
                f"`{what}` regex {spec!r} matches no site (re.fullmatch). Sites: {names}."
            )
        return hit
    if isinstance(spec, Sequence) and all(isinstance(n, str) for n in spec):
        unknown = [n for n in spec if n not in names]
        if unknown:
            raise ConfigError(f"`{what}` names no site called {unknown}. Sites: {names}.")
        return [s for s in sites if s.name in spec]
    raise ConfigError(
        f"`{what}` must be 'auto', a list of site names, a regex string or a callable "
        f"Site -> bool, got {type(spec).__name__}."
    )


def plan_sites(
    gm: GraphModule,
    sites: list[Site],
    spec: SiteSelector = "auto",
    exclude: SiteSelector | None = None,
    config: LaserConfig | None = None,
) -> PassResult:
    """Resolve selectors and mechanisms. Record: a `Plan`."""
    config = config or LaserConfig()
    if not sites:
        raise NoSitesError(
            f"No parameter of {type(gm).__name__} is applied more than once, so there is no "
            "weight-shared (looped) site to compress. laser_fx compresses looped/recursive "
            "models; if the loop runs a data-dependent number of times, compress the loop "
            "body module instead: laser_fx.compress(model.<body>, ...)."
        )
    names = [s.name for s in sites]
    unused = [p for p in config.per_site if not any(re.fullmatch(p, n) for n in names)]
    if unused:
        raise ConfigError(
            f"`per_site` pattern(s) {unused} match no site (re.fullmatch). Sites: {names}."
        )
    explicit = not (isinstance(spec, str) and spec == "auto")
    chosen = select(sites, spec, "sites")
    dropped = {s.name for s in select(sites, exclude, "exclude")}
    plan = Plan()
    for s in sites:
        if s.name in dropped:
            plan.skipped[s.name] = "excluded"
    chosen = [s for s in chosen if s.name not in dropped]
    if not any(s.grad_uses for s in chosen):
        plan.skipped.update({s.name: "no use with grad enabled" for s in chosen})
        chosen = []

    # Module sites first: a block compressed as a whole covers the ops inside it.
    for s in chosen:
        if s.kind != "module":
            continue
        cfg = config.for_site(s.name)
        mode = AUTO_BLOCK_MODE if cfg.mode == "auto" else cfg.mode
        if mode in _BLOCK_MODES:
            plan.chosen[s.name] = (s, mode, cfg)
        elif explicit:  # mode="linear" on a named block: compress its linears
            chosen += [o for o in sites if o.block == s.name and o not in chosen
                       and o.name not in dropped]
    for s in chosen:
        if s.kind == "module" or s.name in plan.chosen:
            continue
        cfg = config.for_site(s.name)
        if s.block in plan.chosen:
            plan.skipped[s.name] = f"covered by block {s.block} ({plan.chosen[s.block][1]})"
        elif cfg.mode in _BLOCK_MODES:
            if explicit:
                raise ConfigError(
                    f"Site {s.name!r} is a {s.kind} op; mode {cfg.mode!r} compresses a whole "
                    f"block. Select its block ({s.block!r}) or use mode='linear' for this site."
                )
            plan.skipped[s.name] = f"mode {cfg.mode!r} applies to blocks and it has none"
        elif s.kind == "conv":
            plan.skipped[s.name] = "conv ops are compressed through their block (region/checkpoint)"
        elif not s.grad_uses:
            plan.skipped[s.name] = "no use with grad enabled"
        else:
            plan.chosen[s.name] = (s, "linear", cfg)
    if not plan.chosen:
        raise NoSitesError(
            f"Nothing to compress: the selected sites were all left alone ({plan.skipped}). "
            f"Sites found: {[s.name for s in sites]}."
        )
    return PassResult(gm, modified=False, record=plan)
