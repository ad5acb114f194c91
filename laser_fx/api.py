"""The one-call API: `compress` (in place), `strip`, `is_compressed`."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration import calibrate
from .config import LaserConfig
from .errors import ConfigError, LaserFxError, NoSitesError
from .granularity import plan_granularity
from .mechanisms import MECHANISMS, Mechanism, choose
from .ops._tensors import walk_tensors
from .param_site import ParamSite, param_sites_of
from .probe import Probe, _as_tuple, probe, run_model
from .report import _GRANULARITY, _SKIPPED, compressed_sites
from .sites import Site, SiteSelector, select
from .wrapper import SiteWrapper, _StepHook, forward_origin

__all__ = ["VerifyError", "compress", "is_compressed", "strip"]



class VerifyError(LaserFxError):
    """The compressed model does not compute what the original computes."""


def is_compressed(model: nn.Module) -> bool:
    """Whether ``model`` holds modules swapped in by `compress`."""
    return isinstance(model, nn.Module) and bool(compressed_sites(model))


@dataclass
class _Plan:
    chosen: list[tuple[Site, Mechanism, LaserConfig]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    granularity: dict[str, dict[str, Any]] = field(default_factory=dict)


def _plan(found: Probe, model: nn.Module, spec: SiteSelector, exclude: SiteSelector | None,
          config: LaserConfig) -> _Plan:
    sites = found.sites
    if not sites:
        raise NoSitesError(
            f"No module or parameter of {type(model).__name__} is applied more than once in "
            "the probe run on the example inputs, so there is no weight-shared (looped) site "
            "to compress. laser_fx compresses looped / recursive models; check that the "
            "example inputs make the model run its recursion (a loop that halts on data may "
            "have stopped after one step on them)."
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
    plan = _Plan()
    plan.skipped.update({n: "excluded" for n in names if n in dropped})
    chosen = [s for s in chosen if s.name not in dropped]
    if not explicit:  # nested sites run inside their block, which covers them
        chosen = [s for s in chosen if s.block is None]
    taken = {s.name for s in chosen}
    for s in chosen:
        if s.block is not None and s.block in taken:
            plan.skipped[s.name] = f"covered by block {s.block}"
        elif s.param is not None and config.for_site(s.name).mode not in ("auto", "linear"):
            plan.skipped[s.name] = (
                f"a parameter applied {s.num_uses} times inside one call of a "
                f"{s.module_type}: only mode 'linear' applies to it (no module to checkpoint); "
                "wrap the loop body in an nn.Module to use checkpoint or region"
            )
        elif s.grad_uses == 0:
            plan.skipped[s.name] = "no call with grad enabled"
        elif s.grad_uses == 1:
            plan.skipped[s.name] = (
                f"called {s.num_uses} times but only once with grad enabled: it keeps the "
                "activations of one call, so there is nothing to compress across recursion steps"
            )
        else:
            cfg = config.for_site(s.name)
            mech = MECHANISMS["linear"] if s.param is not None else choose(s, cfg.mode)
            if mech.name == "checkpoint" and s.block is None:
                _split(plan, s, sites, config, cfg)
            else:
                plan.chosen.append((s, mech, cfg))
    for unit, _, _ in plan.chosen:  # a unit named explicitly too is compressed, not left alone
        plan.skipped.pop(unit.name, None)
    if not plan.chosen:
        calls = {s.name: s.num_uses for s in sites}
        hint = ""
        if found.one_grad_call:
            hint = (
                f" Each of {_recursions(found.one_grad_call, calls)} runs with grad once per "
                "forward (e.g. a "
                "one-step gradient with the earlier recursion steps under torch.no_grad()), "
                "so there is nothing to compress across recursion steps."
            )
        outer = _recursions(list(plan.skipped), calls)
        more = len(plan.skipped) - len(outer)
        inside = f", and {more} modules inside them" if more else ""
        why = (f"the sites were all left alone ({ {n: plan.skipped[n] for n in outer} }{inside})"
               if plan.skipped else f"`sites` selected none of the sites found ({names})")
        raise NoSitesError(f"Nothing to compress in {type(model).__name__}: {why}.{hint}")
    return plan


def _split(plan: _Plan, block: Site, sites: list[Site], config: LaserConfig,
           cfg: LaserConfig) -> None:
    """Checkpoint ``block`` at the granularity ``cfg`` asks for (`laser_fx.granularity`)."""
    level, options = plan_granularity(block, sites, cfg.granularity)
    plan.granularity[block.name] = {
        "chosen": level.name, "asked": cfg.granularity,
        "estimated_peak_bytes": {lv.name: lv.peak for lv in options},
        "units": [u.name for u in level.units],
    }
    for unit in level.units:
        # a per_site pattern naming the unit wins; otherwise the unit runs with its block's config
        ucfg = cfg if unit is block or not any(
            re.fullmatch(p, unit.name) for p in config.per_site) else config.for_site(unit.name)
        mode = "checkpoint" if ucfg.mode == "auto" and unit.kind != "linear" else ucfg.mode
        plan.chosen.append((unit, choose(unit, mode), ucfg))


def _recursions(names: list[str], calls: dict[str, int]) -> list[str]:
    """``names`` without the modules called exactly once per call of a listed ancestor: the
    parts of a recursion, not the recursion (keeps messages short)."""
    return [n for n in names
            if not any(n.startswith(o + ".") and calls.get(o) == calls.get(n) for o in names)]


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> int:
    """Put ``new`` wherever ``old`` is registered below ``root``; returns how many places."""
    parents = [m for m in root.modules(remove_duplicate=False) if m is not new]
    done = 0
    for parent in parents:
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new
                done += 1
    return done


def _verify(model: nn.Module, want: Any, args: tuple, kwargs: dict) -> None:
    got = run_model(model, args, kwargs)
    a = [t for _, t in walk_tensors(want)]
    b = [t for _, t in walk_tensors(got)]
    if len(a) != len(b):
        raise VerifyError(
            f"The compressed {type(model).__name__} returned {len(b)} tensors where the original "
            f"returned {len(a)}."
        )
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        try:
            torch.testing.assert_close(y.detach(), x, equal_nan=True)
        except AssertionError as e:
            raise VerifyError(
                f"Output tensor {i} of the compressed {type(model).__name__} differs from the "
                f"original's on the example inputs: {e}. Compression must not change the "
                "forward; if the model keeps Python state between calls (a counter attribute, "
                "a cache), the two check runs may differ for that reason. Otherwise please "
                "report this with the model."
            ) from e


def compress(
    model: nn.Module,
    sites: SiteSelector = "auto",
    *,
    config: LaserConfig | None = None,
    example_inputs: Sequence[Any] | torch.Tensor = (),
    example_kwargs: dict[str, Any] | None = None,
    exclude: SiteSelector | None = None,
) -> nn.Module:
    """Compress the weight-shared blocks of ``model`` IN PLACE; returns ``model`` itself.

    One eager probe run on the example inputs finds the modules the forward calls 2+ times
    with grad (`find_sites`); each selected one is replaced, wherever it is registered, by a
    `SiteWrapper` that applies the site's mechanism to its grad-enabled calls. The model
    keeps its class, methods, attributes, Python control flow, train/eval behaviour,
    parameters (the same objects) and ``state_dict`` keys. A second run checks that the
    compressed forward returns what the original returned. For a separate compressed copy,
    compress ``copy.deepcopy(model)``; `strip` puts the original modules back.

    Args:
        model: the looped / recursive model, in the mode it is trained in.
        sites: ``"auto"`` (every top-level shared block), a list of site names (module
            paths, see `find_sites`), a regex matched with ``re.fullmatch``, or a callable
            ``Site -> bool``.
        config: `LaserConfig` (default ``LaserConfig()``); ``per_site`` overrides per regex.
        example_inputs: positional inputs, exactly as the training loop passes them.
        example_kwargs: keyword inputs.
        exclude: sites to leave alone, in the same forms as ``sites``.

    Returns:
        ``model``, modified in place.

    Raises:
        NoSitesError: no weight-shared site, or every selected site was left alone (the
            message says why each was).
        ConfigError: invalid config, selector or example inputs; ``model`` already compressed.
        VerifyError: the compressed forward differs from the original's.

    Example::

        model = laser_fx.compress(model, example_inputs=(x,))
        loss_fn(model(x), y).backward()
        print(laser_fx.report(model))
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compress expects an nn.Module, got {type(model).__name__}.")
    if is_compressed(model):
        raise ConfigError(
            f"This {type(model).__name__} is already compressed by laser_fx. Call "
            "laser_fx.strip(model) first to put the original modules back."
        )
    config = LaserConfig() if config is None else config
    if not isinstance(config, LaserConfig):
        raise ConfigError(f"`config` must be a LaserConfig, got {type(config).__name__}.")
    if isinstance(example_inputs, Mapping):
        raise ConfigError(
            "`example_inputs` are the positional inputs (a tuple); pass keyword inputs as "
            f"`example_kwargs`, e.g. example_kwargs={{{', '.join(map(repr, example_inputs))}: ...}}."
        )
    args, kwargs = _as_tuple(example_inputs), dict(example_kwargs or {})
    try:
        inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(
            f"example_inputs/example_kwargs do not match {type(model).__name__}.forward"
            f"{inspect.signature(model.forward)}: {e}. compress finds the shared blocks by "
            "running the model once: pass example_inputs (and example_kwargs) exactly as the "
            "training loop calls the model."
        ) from e
    found = probe(model, args, kwargs)
    plan = _plan(found, model, sites, exclude, config)
    for site, mechanism, cfg in plan.chosen:
        module = found.modules[site.name]
        if site.param is not None:
            ParamSite(site, model.get_parameter(site.param), cfg).attach(module)
        else:
            wrapper = SiteWrapper(module, site, mechanism, cfg)
            wrapper.root = forward_origin(model)
            _replace(model, module, wrapper)
    target = next((c.target_cosine for _, _, c in plan.chosen if c.target_cosine is not None),
                  None)
    every = next((c.recalibrate_every for _, _, c in plan.chosen if c.recalibrate_every), None)
    step_hook = _StepHook(every, (args, kwargs), target)
    model.register_forward_pre_hook(step_hook)
    model.register_forward_hook(step_hook.end, always_call=True)
    object.__setattr__(model, _SKIPPED, dict(plan.skipped))
    object.__setattr__(model, _GRANULARITY, dict(plan.granularity))
    try:
        _verify(model, found.outputs, args, kwargs)
    except BaseException:
        strip(model)
        raise
    finally:
        for w in compressed_sites(model):
            w.reset()  # the check's bases are not the first step's
    if target is not None:
        calibrate(model, args, kwargs, target_cosine=target)
    step_hook.steps = 0  # the check run was no training step
    return model


def strip(model: nn.Module) -> nn.Module:
    """Put the original modules of a compressed ``model`` back, in place; returns ``model``.

    The modules are the very objects `compress` found (same parameters, same state).
    """
    wrappers = compressed_sites(model) if isinstance(model, nn.Module) else []
    if not wrappers:
        raise ConfigError(
            f"strip expects a model compressed by laser_fx.compress, got "
            f"{type(model).__name__} without compressed sites."
        )
    for w in wrappers:
        if isinstance(w, SiteWrapper):
            _replace(model, w, w.wrapped)
    for owner, ps in param_sites_of(model):
        ps.detach_from(owner)
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(hook, _StepHook):
            del model._forward_pre_hooks[key]
    for key, hook in list(model._forward_hooks.items()):
        if isinstance(getattr(hook, "__self__", None), _StepHook):
            del model._forward_hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    model.__dict__.pop(_SKIPPED, None)
    model.__dict__.pop(_GRANULARITY, None)
    return model
