"""Record the activation matrices each weight-shared site stores, per grad-enabled use.

The capture runs ONE training-mode forward of the eager model with hooks:

- module sites (the shared block): every floating tensor argument of rank >= 2 of a call,
  in call order (positional, then keyword), is one *slot*; this is what a compressed
  checkpoint stores (slot i of one call is tracked from slot i of the previous call);
- op sites (a shared ``nn.Linear`` / ``nn.ConvNd``): the op's input, which is what a
  compressed linear stores.

Only calls made while ``torch.is_grad_enabled()`` are recorded: calls under ``no_grad``
(TRM's first T-1 cycles) keep nothing for backward, so there is nothing to compress.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .._isolated import cuda_devices, isolated
from ..errors import ConfigError
from ..probe import _as_tuple, find_sites
from ..sites import Site, SiteSelector, select

__all__ = ["Capture", "capture_activations"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Capture:
    """The recorded activation matrices of one site slot.

    Attributes:
        site: site name (`Site.name`).
        kind: the site's kind (``"linear"``, ``"conv"``, ``"module"``, ...).
        slot: argument position for module sites (0 for op sites).
        width: feature width (last dim of every matrix).
        uses: for each matrix, the index of its use in ``Site.uses`` (the recursion step).
        matrices: ``(tokens, width)`` float64 CPU copies, one per grad-enabled use.
        calls: calls seen (grad-enabled or not).
    """

    site: str
    kind: str
    slot: int
    width: int
    uses: list[int] = field(default_factory=list)
    matrices: list[Tensor] = field(default_factory=list)
    calls: int = 0

    @property
    def key(self) -> str:
        """``site`` for op sites, ``site[slot]`` for module sites."""
        return f"{self.site}[{self.slot}]" if self.kind == "module" else self.site


def _as_matrix(t: Tensor, conv: bool) -> Tensor:
    """``t`` as (tokens, width) float64 on the CPU; conv inputs have channels on dim 1."""
    t = t.detach()
    if conv:
        t = t.movedim(1, -1)
    return t.reshape(-1, t.shape[-1]).to(device="cpu", dtype=torch.float64).clone()


def _tensor_args(args: tuple, kwargs: dict[str, Any]) -> list[Tensor]:
    flat = [*args, *kwargs.values()]
    return [a for a in flat if isinstance(a, Tensor) and a.is_floating_point() and a.ndim >= 2]


def _op_module(model: nn.Module, site: Site) -> nn.Module | None:
    """The ``nn.Linear``/``nn.ConvNd`` owning the site's parameter, if it applies it itself."""
    if site.param is None:  # a shared nn.Linear / nn.ConvNd module: the site is its path
        mod = model.get_submodule(site.name)
        return mod if isinstance(mod, (nn.Linear, *_CONV)) else None
    owner = site.param.rsplit(".", 1)[0] if "." in site.param else ""
    try:
        mod = model.get_submodule(owner)
    except AttributeError:
        return None
    if isinstance(mod, (nn.Linear, *_CONV)) and site.param.endswith(".weight"):
        return mod
    return None


def capture_activations(
    model: nn.Module,
    inputs: Sequence[Any] | Tensor,
    sites: SiteSelector = "auto",
    example_kwargs: dict[str, Any] | None = None,
) -> tuple[list[Site], list[Capture], dict[str, str]]:
    """Run one training-mode forward and record every selected site's stored activations.

    The model's RNG stream, buffers (BatchNorm statistics) and train/eval mode are restored
    afterwards; no backward runs.

    Args:
        model: the eager model (not a compressed one).
        inputs: positional example inputs, as for `laser_fx.compress`.
        sites: ``"auto"``, names, a regex or a callable ``Site -> bool`` (see `compress`).
        example_kwargs: keyword example inputs.

    Returns:
        (the selected sites, one `Capture` per site slot, ``{site: note (why not captured, or a caveat)}``).
    """
    args, kwargs = _as_tuple(inputs), dict(example_kwargs or {})
    all_sites = find_sites(model, args, kwargs or None)
    chosen = select(all_sites, sites, "sites")
    if not chosen:
        raise ConfigError(
            f"`sites` selected none of the {len(all_sites)} weight-shared sites "
            f"{[s.name for s in all_sites]}; pass 'auto' or one of those names."
        )
    captures: dict[tuple[str, int], Capture] = {}
    notes: dict[str, str] = {}
    handles = []

    def hook_for(site: Site, conv: bool):
        counter = {"calls": 0}

        def hook(_mod: nn.Module, hargs: tuple, hkwargs: dict[str, Any]) -> None:
            use = counter["calls"]
            counter["calls"] += 1
            tensors = _tensor_args(hargs, hkwargs)
            if site.kind != "module":
                tensors = tensors[:1]
            for slot, t in enumerate(tensors):
                width = int(t.shape[1] if conv else t.shape[-1])
                cap = captures.setdefault(
                    (site.name, slot), Capture(site.name, site.kind, slot, width)
                )
                cap.calls += 1
                # only grad-enabled calls keep activations for backward
                if torch.is_grad_enabled():
                    cap.uses.append(use)
                    cap.matrices.append(_as_matrix(t, conv))

        return hook

    for site in chosen:
        if site.kind == "module":
            mod = model.get_submodule(site.name)
            conv = False
        else:
            mod = _op_module(model, site)
            conv = isinstance(mod, _CONV)
            if mod is None:
                notes[site.name] = (
                    f"{site.kind} site applied by a custom module (not nn.Linear/nn.ConvNd): "
                    "a module hook cannot see the op's input"
                )
                continue
        handles.append(mod.register_forward_pre_hook(hook_for(site, conv), with_kwargs=True))
    devices = cuda_devices(tree_leaves((args, kwargs)))
    try:
        with isolated(model, devices=devices), torch.enable_grad():
            model.train()
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    ordered = [c for site in chosen for (name, _), c in captures.items() if name == site.name]
    for site in chosen:
        if site.name in notes:
            continue
        got = [c for c in ordered if c.site == site.name]
        if not got:
            notes[site.name] = "no floating tensor input of rank >= 2 was seen"
        elif got[0].calls != site.num_uses:
            notes[site.name] = (
                f"eager forward called it {got[0].calls} times, the traced graph "
                f"{site.num_uses}: use indices may not line up (recorded anyway)"
            )
    return chosen, ordered, notes
