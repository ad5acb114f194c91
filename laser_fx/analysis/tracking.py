"""How well warm-started power iterations track the top-k subspace across recursion steps.

Two measurements per site slot, over its grad-enabled uses in order:

1. `track_subspace`: start from the exact top-k basis of the first use; at every later use,
   run ``iters`` warm-started block power iterations from the previous basis (the library's
   own `subspace_iteration`, no oversampling, no reset) and compare with that use's exact
   top-k subspace: sine of the largest principal angle and the energy lost against the
   optimum. This isolates the paper's claim (b) from the library's reset heuristics.
2. `replay_tracker`: feed the same matrices to a fresh `SubspaceTracker` at a given
   `LaserConfig` (default: the library default) and count what it did: resets, power
   updates, shrinks, dense stores.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._linalg import subspace_iteration
from ..config import LaserConfig
from ..tracker import SubspaceTracker
from .spectra import principal_angles, subspace_energy, top_basis

__all__ = ["replay_tracker", "track_subspace"]


def track_subspace(matrices: list[Tensor], k: int, iters: int) -> list[dict[str, float | None]]:
    """Tracking error of warm-started power iteration against the exact top-k, per step.

    Args:
        matrices: (tokens, width) float64 activations, in recursion order.
        k: tracked rank (1 <= k <= width).
        iters: power iterations per step (1 or 2 in the report).

    Returns:
        One dict per step: ``sin_max`` (sine of the largest principal angle between the
        tracked and the exact top-k subspace), ``energy_gap`` (optimal rank-k energy minus
        the tracked basis's, as a fraction of the step's energy), ``stale_fidelity`` (energy
        the previous step's basis keeps of this step before updating: what triggers an
        update). Step 0 is the exact basis (errors 0, ``stale_fidelity`` None).
    """
    if not matrices:
        return []
    width = matrices[0].shape[1]
    if not 1 <= k <= width:
        raise ValueError(f"tracked rank `k` must be in [1, {width}], got {k}.")
    q = top_basis(matrices[0], k)
    out: list[dict[str, float | None]] = [
        {"sin_max": 0.0, "energy_gap": 0.0, "stale_fidelity": None}
    ]
    for x in matrices[1:]:
        x = x.double()
        stale = subspace_energy(x, q)
        q = subspace_iteration(x, q, iters)
        exact = top_basis(x, k)
        angles = principal_angles(exact, q)
        gap = max(0.0, subspace_energy(x, exact) - subspace_energy(x, q))
        out.append({"sin_max": float(torch.sin(angles[-1])), "energy_gap": gap,
                    "stale_fidelity": stale})
    return out


def replay_tracker(
    matrices: list[Tensor], width: int, config: LaserConfig | None = None
) -> dict[str, Any]:
    """Replay the recorded uses through a fresh `SubspaceTracker` and report what it did.

    Args:
        matrices: (tokens, width) activations, in recursion order.
        width: the slot's width.
        config: tracker config (default ``LaserConfig()``, the one `compress` uses).

    Returns:
        The tracker's `stats` after the replay (``resets``, ``power_updates``, ``shrinks``,
        ``dense_stores``, ``rank``, ...) plus per-step ``ranks`` and ``fidelities``
        (0 rank: stored dense).
    """
    trk = SubspaceTracker(width, config or LaserConfig())
    ranks, fids = [], []
    for x in matrices:
        packed = trk.compress(x.float())
        ranks.append(0 if packed.is_dense else int(packed.coeffs.shape[1]))
        fids.append(float(trk.last_fidelity))
    stats = trk.stats()
    return {**stats, "ranks": ranks, "fidelities": fids}
