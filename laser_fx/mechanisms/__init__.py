"""The mechanisms a site can be compressed with; one class each, registered here.

* ``"checkpoint"`` (`Checkpoint`): a call keeps only its inputs, low-rank; re-run in backward.
* ``"region"`` (`Region`): activation-shaped tensors saved inside a call are stored low-rank.
* ``"linear"`` (`Linear`): each linear op of a call saves its input as tracked coefficients.

``mode="auto"`` takes `Linear` for a shared ``nn.Linear`` (it saves only its input, so a
re-run would cost time for nothing) and `Checkpoint` for every other module (README,
"Which to use").
"""

from __future__ import annotations

from ..errors import ConfigError
from ..sites import Site
from .base import Mechanism
from .checkpoint import Checkpoint
from .linear import Linear
from .region import Region

__all__ = ["MECHANISMS", "Checkpoint", "Linear", "Mechanism", "Region", "choose"]

#: mode name -> mechanism
MECHANISMS: dict[str, Mechanism] = {m.name: m for m in (Checkpoint(), Region(), Linear())}


def choose(site: Site, mode: str) -> Mechanism:
    """The mechanism ``mode`` gives ``site`` (``"auto"`` resolved as described above).

    Raises:
        ConfigError: the mechanism does not apply to the site.
    """
    if mode == "auto":
        mode = "linear" if site.kind == "linear" or site.param is not None else "checkpoint"
    mech = MECHANISMS.get(mode)
    if mech is None:
        raise ConfigError(f"`mode` must be one of {sorted(MECHANISMS)} or 'auto', got {mode!r}.")
    why = mech.applies_to(site)
    if why is not None:
        raise ConfigError(f"Cannot compress site {site.name!r} with mode {mode!r}: {why}.")
    return mech
