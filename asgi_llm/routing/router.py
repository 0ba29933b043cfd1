"""Public model names → ordered plans of targets.

A *model* is the public name a client sends; it maps to an ordered list of
:class:`Target` s. :meth:`Router.plan` turns a request into a plan: the targets to try,
in order. This module holds the ``priority`` strategy (the recipe order); the other
strategies plug in through :data:`STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from asgi_llm.errors import ModelNotFoundError

if TYPE_CHECKING:
    from asgi_llm.context import RequestContext

__all__ = ["STRATEGIES", "ModelRoute", "Price", "Router", "Target"]


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
    route: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "route", f"{self.provider}/{self.model}")


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """A public model: its strategy and its targets, in recipe order."""

    name: str
    targets: tuple[Target, ...]
    strategy: str = "priority"


Strategy = Callable[["RequestContext", Sequence[Target]], list[Target]]


def _priority(ctx: RequestContext, targets: Sequence[Target]) -> list[Target]:
    return list(targets)


STRATEGIES: Mapping[str, Strategy] = {"priority": _priority}
"""Strategy name → function ordering a model's targets for one request."""


class Router:
    """Resolves public model names to plans.

    Example:
        >>> router = Router([ModelRoute("chat", (Target("provider-a", "gpt-4o-mini"),))])
        >>> router.plan(ctx)  # [Target(provider='provider-a', model='gpt-4o-mini', ...)]
    """

    def __init__(self, models: Sequence[ModelRoute]) -> None:
        for m in models:
            if m.strategy not in STRATEGIES:
                raise ValueError(
                    f"model {m.name!r}: strategy {m.strategy!r} is not available in this version "
                    f"(available: {', '.join(sorted(STRATEGIES))})"
                )
            if not m.targets:
                raise ValueError(f"model {m.name!r} has no targets")
        self._models = {m.name: m for m in models}
        self._names = sorted(self._models)

    def model_names(self) -> list[str]:
        """Public model names, sorted."""
        return list(self._names)

    def get(self, name: str) -> ModelRoute | None:
        return self._models.get(name)

    def plan(self, ctx: RequestContext) -> list[Target]:
        """The ordered targets to try for this request.

        Raises :class:`ModelNotFoundError` for a model that is not configured.
        """
        name = ctx.model or ""
        route = self._models.get(name)
        if route is None:
            raise ModelNotFoundError(
                f"The model '{name}' does not exist or you do not have access to it. "
                "GET /v1/models lists the models you can use.",
                param="model",
            )
        return STRATEGIES[route.strategy](ctx, route.targets)
