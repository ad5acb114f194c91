"""What a site is (`Site`, `Use`) and how users select sites (`select`).

A leaf module: the probe (`laser_fx.probe`) fills these types in, `compress`, `report` and
`analyze` read them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["Site", "SiteSelector", "Use", "select"]

#: ``"auto"``, a list of site names, a regex (``re.fullmatch``) or a callable ``Site -> bool``
SiteSelector = str | Sequence[str] | Callable[["Site"], bool]


@dataclass(frozen=True)
class Use:
    """One call of a site: one recursion step.

    Attributes:
        step: position among the site's uses, in execution order.
        node: ``"<site>@<call index>"``.
        grad_enabled: whether the call ran with grad enabled (only those keep activations).
        call_index: index of the call among the module's calls (for parameter sites, among
            the op applications inside one call of the owning module).
        shape: shape of the call's first floating tensor input (the activation).
        nbytes: bytes autograd saved for backward during this call, measured in the probe
            run (None for calls without grad).
        input_bytes: bytes of the call's distinct floating tensor inputs (what a checkpoint
            of the call keeps, stored dense).
    """

    step: int
    node: str
    grad_enabled: bool
    call_index: int = -1
    shape: tuple[int, ...] | None = None
    nbytes: int | None = None
    input_bytes: int | None = None


@dataclass(frozen=True)
class Site:
    """A weight-shared site: a module called 2+ times in one forward, or a parameter that
    one call of a module applies 2+ times (``X @ W`` in a Python loop).

    Attributes:
        name: module path (``net``, ``model.inner.L_level``), or the parameter's path for a
            parameter site. Unique: a module path names one module.
        kind: ``"module"`` (a block of layers), ``"linear"``, ``"conv"``, ``"rnn_cell"``
            (a shared module of that type), or ``"matmul"`` / ``"linear"`` with ``param``
            set (a parameter applied by ops inside one module call).
        width: the largest feature width among ``widths``.
        uses: every call, in execution order.
        param: qualified name of the parameter (parameter sites only).
        widths: feature widths of the inputs and of the linear / conv ops inside the site.
        block: name of the enclosing module site, when this one runs inside it.
        module_type: class name of the module (of the owner, for a parameter site).
        conv_widths: the subset of ``widths`` that are convolution channel counts (their
            activations keep the features on axis 1).
        parent: the innermost site whose calls this one runs inside (None at the top level):
            a block's layers name the block, their sublayers the layer.
    """

    name: str
    kind: str
    width: int
    uses: tuple[Use, ...]
    param: str | None = None
    widths: tuple[int, ...] = ()
    block: str | None = None
    module_type: str = ""
    conv_widths: tuple[int, ...] = ()
    parent: str | None = None

    @property
    def num_uses(self) -> int:
        return len(self.uses)

    @property
    def grad_uses(self) -> int:
        return sum(u.grad_enabled for u in self.uses)

    @property
    def nograd_uses(self) -> int:
        return len(self.uses) - self.grad_uses

    @property
    def activation_bytes(self) -> int | None:
        """Bytes autograd saved in the grad-enabled uses (None when unknown)."""
        sizes = [u.nbytes for u in self.uses if u.grad_enabled]
        return None if any(s is None for s in sizes) else sum(sizes)  # type: ignore[misc]

    def __str__(self) -> str:
        what = self.module_type or self.kind
        return (
            f"{self.name} ({what}, width {self.width}): {self.num_uses} uses, "
            f"{self.grad_uses} with grad"
        )


def select(sites: list[Site], spec: SiteSelector | None, what: str) -> list[Site]:
    """Sites matching ``spec`` (``"auto"``, names, a regex, or a callable).

    Raises:
        ConfigError: a name or regex matches nothing, or ``spec`` has another type.
    """
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
