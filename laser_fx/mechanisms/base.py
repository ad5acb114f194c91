"""`Mechanism`: how one kind of site keeps its activations (one class per mechanism)."""

from __future__ import annotations

from typing import Any, ClassVar

from ..sites import Site

__all__ = ["Mechanism"]


class Mechanism:
    """One way of storing a site's activations low-rank.

    A subclass says which sites it applies to (`applies_to`), runs one grad-enabled call of
    a wrapped module (`call`, and `traced` inside a compiled graph), and describes the state for the report (`row`). Instances
    hold no state of their own: everything per site lives on its `SiteWrapper`.
    """

    name: ClassVar[str] = ""

    def applies_to(self, site: Site) -> str | None:
        """None when this mechanism can compress ``site``, else why not."""
        if site.param is not None:
            return (f"mechanism {self.name!r} compresses the calls of a module; {site.name} is a "
                    "parameter applied inside one call of its module")
        return None

    def call(self, wrapper: Any, args: tuple, kwargs: dict, compiled: bool = False) -> Any:
        """One grad-enabled call of ``wrapper.wrapped(*args, **kwargs)``; ``compiled``: the
        model runs under torch.compile (a mechanism may run the block compiled)."""
        raise NotImplementedError

    def traceable(self, wrapper: Any, args: tuple, kwargs: dict) -> bool:
        """Whether dynamo may trace this grad-enabled call into the compiled graph with
        `traced` (else it is one opaque call of `call`, a graph break)."""
        return False

    def traced(self, wrapper: Any, args: tuple, kwargs: dict) -> Any:
        """One grad-enabled call while dynamo traces the model (after `traceable`)."""
        raise NotImplementedError

    def row(self, wrapper: Any) -> dict[str, Any]:
        """The site's report row (see `laser_fx.report`)."""
        site = wrapper.site
        stats = [t.stats() for t in wrapper.trackers.values()]
        used = [s for s in stats if s["calls"]]
        st = wrapper.stats
        return {
            "name": site.name,
            "mechanism": self.name,
            "module_type": site.module_type,
            "uses": site.num_uses,
            "grad_uses": site.grad_uses,
            "width": site.width,
            "widths": list(site.widths) or [site.width],
            "rank": max((s["rank"] for s in used), default=0),
            "ranks": [s["rank"] for s in stats],
            "fidelity": min((s["last_fidelity"] for s in used), default=None),
            "min_fidelity": min((s["min_fidelity"] for s in used), default=None),
            "resets": sum(s["resets"] for s in stats),
            "calls": st.calls,
            "nonfinite": sum(s["nonfinite"] for s in stats),
            "stored_bytes": int(st.total_stored_bytes),
            "dense_bytes": int(st.uncompressed_bytes),
            "energy": wrapper.config.energy if wrapper.config.rank is None else None,
            "energies": dict(wrapper.slot_energy or {}),
            "calibrated_cosine": None if wrapper.calibration is None else wrapper.calibration.cosine,
        }
