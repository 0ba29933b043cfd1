"""Core vocabulary: where a public model can be served (:class:`Target`), at what
:class:`Price`, and the recipe's node selectors (:class:`NodeTargets`).

Plain frozen dataclasses at the bottom of the package: providers, routing, nodes and the
ledger all speak them, and none of those has to import another to do so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

__all__ = ["NodeTargets", "Price", "Target"]


@dataclass(frozen=True, slots=True)
class Price:
    """USD per one million tokens."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """One place a public model can be served: a provider and its model name there."""

    provider: str
    model: str
    price: Price | None = None
    weight: float = 1.0
    context_window: int | None = None
    prefill: bool = True
    kind: str = "provider"  # "provider" | "node"
    route: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "route", f"{self.provider}/{self.model}")


@dataclass(frozen=True, slots=True)
class NodeTargets:
    """A recipe target ``{nodes: <selector>, model: ...}``: whichever enrolled nodes match
    at request time. The router's :data:`NodeResolver` expands it into node
    :class:`Target` s (``kind="node"``) for the caller's org."""

    selector: str
    model: str
    price: Price | None = None
    weight: float = 1.0
    context_window: int | None = None
    prefill: bool = True

    @property
    def route(self) -> str:
        """A name for the selector where a route name is expected (cache keys, price
        lookups): ``nodes:<selector>/<model>`` — never a real target's route."""
        return f"nodes:{self.selector}/{self.model}"
