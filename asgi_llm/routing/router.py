"""Public model names → ordered plans of targets, with the reasons.

A *model* is the public name a client sends; it maps to targets (a provider's model,
with price, weight, context window). :meth:`Router.make_plan` turns one request into a
:class:`Plan` — the targets to try, in order — in five steps, each recorded so that
``POST /admin/explain`` can say why:

1. **Candidates**: the model's targets, then those of fallback models the request names
   (OpenRouter ``models[]``, LiteLLM ``fallbacks``), without duplicates.
2. **Rule**: the first recipe rule whose ``match`` holds (org, key, model, header,
   metadata) may choose the strategy and keep/drop targets (``only``/``exclude``) —
   e.g. "requests marked private never leave our own nodes".
3. **Overrides** (OpenRouter ``provider{order, only, ignore, allow_fallbacks, sort,
   max_price}``): the caller narrows or reorders further; it can never widen what a
   rule allowed.
4. **Strategy** orders the primary model's targets: ``priority`` (recipe order),
   ``weighted`` (random, by weight), ``cheapest`` (estimated cost of this request, priced
   by :mod:`asgi_llm.usage.accounting` like budgets and the ledger),
   ``fastest`` (latency EWMA; unmeasured first so they get measured), ``least-busy``
   (fewest in flight). Fallback models' targets follow in their own order.
5. **Health**: targets whose every key is open or cooling are skipped; a request with
   an assistant prefill skips targets declared ``prefill: false``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from asgi_llm.errors import InvalidRequestError, ModelNotFoundError, RateLimitError, ServiceUnavailableError
from asgi_llm.targets import NodeTargets, Price, Target
from asgi_llm.usage.accounting import Accountant, estimate_request

if TYPE_CHECKING:
    from asgi_llm.routing.rules import RoutingRule
    from asgi_llm.context import RequestContext
    from asgi_llm.routing.health import HealthTracker

__all__ = ["STRATEGIES", "ModelRoute", "NodeResolver", "NodeTargets", "Plan", "Price", "Router", "Target"]


_AUTO_MAX = 10_000  # auto-routed names remembered (a bound: names come from nodes)

NodeResolver = Callable[["NodeTargets", "RequestContext"], list[Target]]
"""Expands a :class:`NodeTargets` into the live node targets the caller may use."""


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """A public model: its strategy and its targets (or node selectors), in recipe order."""

    name: str
    targets: tuple[Target | NodeTargets, ...]
    strategy: str = "priority"


@dataclass
class Plan:
    """The targets to try, in order, and how they were chosen."""

    model: str
    targets: list[Target]
    strategy: str
    rule: str | None = None
    allow_fallbacks: bool = True
    steps: list[dict[str, Any]] = field(default_factory=list)

    def skip(self, target: Target, reason: str) -> None:
        self.steps.append({"route": target.route, "skipped": reason})

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "strategy": self.strategy,
            "rule": self.rule,
            "allow_fallbacks": self.allow_fallbacks,
            "plan": [t.route for t in self.targets],
            "steps": self.steps,
        }


# ----------------------------------------------------------------- strategies

Strategy = Callable[["Router", "RequestContext", list[Target]], list[Target]]


def _priority(router: Router, ctx: RequestContext, targets: list[Target]) -> list[Target]:
    return list(targets)


def _weighted(router: Router, ctx: RequestContext, targets: list[Target]) -> list[Target]:
    pool = list(targets)
    out: list[Target] = []
    while pool:
        pick = router.rng.choices(range(len(pool)), weights=[t.weight for t in pool])[0]
        out.append(pool.pop(pick))
    return out


def _cheapest(router: Router, ctx: RequestContext, targets: list[Target]) -> list[Target]:
    acct = router.accountant
    prompt, completion = estimate_request(ctx, acct.default_max_tokens)
    inf = Decimal("Infinity")
    return sorted(targets, key=lambda t: c if (c := acct.estimate_cost(t, prompt, completion)) is not None else inf)


def _fastest(router: Router, ctx: RequestContext, targets: list[Target]) -> list[Target]:
    if router.health is None:
        return list(targets)
    health = router.health
    return sorted(targets, key=lambda t: lat if (lat := health.latency(t.route)) is not None else -1.0)


def _least_busy(router: Router, ctx: RequestContext, targets: list[Target]) -> list[Target]:
    health, extra = router.health, router.extra_load

    def load(t: Target) -> float:
        # The gateway's own in-flight count, plus what the target reports (an engine's
        # queue depth, for nodes) when a load signal is configured.
        return (health.in_flight(t.route) if health is not None else 0) + (extra(t) if extra is not None else 0.0)

    return sorted(targets, key=load)


STRATEGIES: Mapping[str, Strategy] = {
    "priority": _priority,
    "weighted": _weighted,
    "cheapest": _cheapest,
    "fastest": _fastest,
    "least-busy": _least_busy,
}
"""Strategy name → function ordering targets for one request."""

_OPENROUTER_SORT = {"price": "cheapest", "throughput": "fastest", "latency": "fastest"}


def _selects(target: Target, names: Sequence[str]) -> bool:
    """Does a provider / route / 'nodes' list name this target?"""
    return target.provider in names or target.route in names or (target.kind == "node" and "nodes" in names)


class Router:
    """Resolves public model names to plans.

    Args:
        models: the public models.
        rules: recipe routing rules (first match applies).
        health: breakers and latency/load statistics (optional).
        key_ids: provider → its upstream key ids, so health can tell whether any key works.
        rng: random source for ``weighted`` (inject a seeded one in tests).

    Example:
        >>> router = Router([ModelRoute("chat", (Target("provider-a", "gpt-4o-mini"),))])
        >>> router.plan(ctx)  # [Target(provider='provider-a', model='gpt-4o-mini', ...)]
    """

    def __init__(
        self,
        models: Sequence[ModelRoute],
        *,
        rules: Sequence[RoutingRule] = (),
        health: HealthTracker | None = None,
        key_ids: Mapping[str, list[str]] | None = None,
        rng: random.Random | None = None,
        node_resolver: NodeResolver | None = None,
        extra_load: Callable[[Target], float] | None = None,
        accountant: Accountant | None = None,
    ) -> None:
        for m in models:
            if m.strategy not in STRATEGIES:
                raise ValueError(f"model {m.name!r}: unknown strategy {m.strategy!r} (known: {', '.join(STRATEGIES)})")
            if not m.targets:
                raise ValueError(f"model {m.name!r} has no targets")
        self._models = {m.name: m for m in models}
        self._names = sorted(self._models)
        self.rules = list(rules)
        self.health = health
        self.key_ids = dict(key_ids or {})
        self.rng = rng or random.Random()
        self.node_resolver = node_resolver
        self.extra_load = extra_load
        self.accountant = accountant or Accountant(router=self)
        self.auto_models: Callable[[str | None], set[str]] | None = None
        """Point-and-enroll (set by ``asgi_llm.recipe.nodes`` unless ``nodes.auto_models: false``):
        the model names online nodes advertise — routable for ``org`` (``None``: for anyone).
        A name the recipe maps is never auto-routed; see :meth:`_auto_route`."""
        self._auto: dict[str, ModelRoute] = {}

    def expand(self, ctx: RequestContext, targets: Sequence[Target | NodeTargets]) -> list[Target]:
        """Replace node selectors by the live nodes that match them (none without a resolver).

        Resolved once per request: the quota layer prices the nodes at admission
        (:meth:`reachable`) and the plan then uses those very nodes, at those prices.
        """
        out: list[Target] = []
        for t in targets:
            if isinstance(t, NodeTargets):
                if self.node_resolver is not None:
                    memo = ctx.node_choices
                    found = memo.get(id(t))
                    if found is None:
                        found = memo[id(t)] = self.node_resolver(t, ctx)
                    out.extend(found)
            else:
                out.append(t)
        return out

    def model_names(self) -> list[str]:
        """Public model names, sorted."""
        return list(self._names)

    def get(self, name: str) -> ModelRoute | None:
        """The model ``name`` for any caller: the recipe's, or an auto-routed node model
        (which :meth:`plan` still resolves per org — another org gets a 404)."""
        route = self._models.get(name)
        if route is None and self.auto_models is not None and isinstance(name, str):
            route = self._auto_route(name, None)
        return route

    def auto_model_names(self, org: str) -> list[str]:
        """Names online nodes advertise to ``org`` that the recipe does not map, sorted."""
        if self.auto_models is None:
            return []
        return sorted(n for n in self.auto_models(org) if n not in self._models)

    def _auto_route(self, name: str, org: str | None) -> ModelRoute | None:
        """``{nodes: any, model: <name>}`` when a node ``org`` may use advertises ``name``."""
        assert self.auto_models is not None
        if name in self._models or name not in self.auto_models(org):
            return None
        route = self._auto.get(name)
        if route is None:
            # One stable object per name, so the node resolver's per-selector cache holds.
            if len(self._auto) >= _AUTO_MAX:
                self._auto.clear()
            route = self._auto[name] = ModelRoute(name=name, targets=(NodeTargets("any", model=name),))
        return route

    def plan(self, ctx: RequestContext, headers: Sequence[tuple[bytes, bytes]] = ()) -> list[Target]:
        """The ordered targets to try (see :meth:`make_plan`)."""
        return self.make_plan(ctx, headers).targets

    def _resolve(self, name: Any, ctx: RequestContext, param: str) -> ModelRoute:
        route = self._models.get(name) if isinstance(name, str) else None
        if route is None and self.auto_models is not None and isinstance(name, str):
            route = self._auto_route(name, ctx.principal.org)  # only the orgs that may use such a node
        if route is None or not ctx.principal.allows_model(route.name):
            raise ModelNotFoundError(
                f"The model '{name}' does not exist or you do not have access to it. "
                "GET /v1/models lists the models you can use.",
                param=param,
            )
        return route

    def _request(self, ctx: RequestContext, headers: Sequence[tuple[bytes, bytes]]
                 ) -> tuple[ModelRoute, list[ModelRoute], RoutingRule | None, dict[str, Any]]:
        """The request's model, its fallback models (``fallbacks``, ``models[]``), the
        matching rule and the validated ``provider`` overrides."""
        primary = self._resolve(ctx.model, ctx, "model")
        payload = ctx.payload
        fallback_routes = [
            self._resolve(name, ctx, f"{field_name}[{i}]")
            for field_name, names in _fallback_lists(payload)
            for i, name in enumerate(names)
        ]
        return primary, fallback_routes, self._match_rule(ctx, headers), _provider_overrides(payload)

    def reachable(self, ctx: RequestContext, headers: Sequence[tuple[bytes, bytes]] = ()) -> list[Target]:
        """Every target this request's plan may try: the model's targets and those of its
        fallback models (``fallbacks``, ``models[]``), node selectors resolved (once per
        request, as the plan will see them), after the rule and ``provider`` filters —
        they only ever remove — and before health and ordering, which change with time.
        What the quota layer prices a reservation over. Raises what :meth:`make_plan` does
        for an unknown model or malformed overrides.
        """
        primary, fallback_routes, rule, provider = self._request(ctx, headers)
        targets = self.expand(ctx, primary.targets)
        for fb in fallback_routes:
            targets.extend(self.expand(ctx, fb.targets))
        return self._filter(Plan(model=primary.name, targets=[], strategy=primary.strategy), targets, rule, provider, ctx)

    def make_plan(self, ctx: RequestContext, headers: Sequence[tuple[bytes, bytes]] = ()) -> Plan:
        """Build the plan for this request.

        Raises :class:`ModelNotFoundError` for an unknown (or not allowed) model,
        :class:`InvalidRequestError` for malformed overrides, and
        :class:`ServiceUnavailableError` (with ``Retry-After``) when every candidate is
        unhealthy.
        """
        primary, fallback_routes, rule, provider = self._request(ctx, headers)
        strategy = primary.strategy
        if rule is not None and rule.strategy:
            strategy = rule.strategy
        if provider.get("sort"):
            strategy = _OPENROUTER_SORT[provider["sort"]]
        plan = Plan(model=primary.name, targets=[], strategy=strategy, rule=rule.name if rule else None)
        if rule is not None and rule.allow_fallbacks is False or provider.get("allow_fallbacks") is False:
            plan.allow_fallbacks = False

        ordered = STRATEGIES[strategy](self, ctx, self.expand(ctx, primary.targets))
        for fb in fallback_routes:
            ordered.extend(STRATEGIES[fb.strategy](self, ctx, self.expand(ctx, fb.targets)))
        candidates: list[Target] = []
        seen: set[str] = set()
        for t in ordered:
            if t.route not in seen:
                seen.add(t.route)
                candidates.append(t)

        candidates = self._filter(plan, candidates, rule, provider, ctx)
        if not candidates:
            why = "; ".join(f"{s['route']}: {s['skipped']}" for s in plan.steps) or "no node that serves it is online"
            raise ServiceUnavailableError(
                f"No target of model '{primary.name}' may serve this request: {why}.",
                code="no_eligible_target",
            )
        healthy = self._healthy(plan, candidates)
        if not healthy:
            retry_after = {"retry-after": str(self._retry_after(candidates))}
            if all(s["skipped"] == "unhealthy (cooling)" for s in plan.steps if "unhealthy" in s["skipped"]):
                raise RateLimitError(
                    f"Every target of model '{primary.name}' is rate-limited upstream; retry after {retry_after['retry-after']} s.",
                    code="upstream_rate_limited",
                    headers=retry_after,
                )
            raise ServiceUnavailableError(
                f"Every target of model '{primary.name}' is unavailable right now: "
                + "; ".join(_describe(s) for s in plan.steps if "unhealthy" in s["skipped"]),
                code="no_healthy_target",
                headers=retry_after,
            )
        plan.targets = healthy if plan.allow_fallbacks else healthy[:1]
        return plan

    # ----------------------------------------------------------------- steps

    def _match_rule(self, ctx: RequestContext, headers: Sequence[tuple[bytes, bytes]]) -> RoutingRule | None:
        for rule in self.rules:
            m = rule.match
            if m.org is not None and ctx.principal.org not in m.org:
                continue
            if m.key is not None and ctx.principal.key_id not in m.key and (ctx.principal.name or "") not in m.key:
                continue
            if m.model is not None and ctx.model not in m.model:
                continue
            if m.header is not None:
                got = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
                if any(got.get(k.lower()) != str(v) for k, v in m.header.items()):
                    continue
            if m.metadata is not None:
                meta = ctx.payload.get("metadata")
                if not isinstance(meta, dict) or any(_loose_eq(meta.get(k), v) is False for k, v in m.metadata.items()):
                    continue
            return rule
        return None

    def _filter(self, plan: Plan, targets: list[Target], rule: RoutingRule | None,
                provider: dict[str, Any], ctx: RequestContext) -> list[Target]:
        prefill = _has_prefill(ctx.payload)
        max_price = provider.get("max_price")
        out: list[Target] = []
        for t in targets:
            if rule is not None and rule.only is not None and not _selects(t, rule.only):
                plan.skip(t, f"rule {rule.name or '(unnamed)'}: not in only")
            elif rule is not None and rule.exclude is not None and _selects(t, rule.exclude):
                plan.skip(t, f"rule {rule.name or '(unnamed)'}: excluded")
            elif provider.get("only") is not None and not _selects(t, provider["only"]):
                plan.skip(t, "provider.only")
            elif provider.get("ignore") is not None and _selects(t, provider["ignore"]):
                plan.skip(t, "provider.ignore")
            elif max_price and (unit := self.accountant.unit_price(t)) is not None and (
                unit[0] > max_price.get("prompt", Decimal("Infinity"))
                or unit[1] > max_price.get("completion", Decimal("Infinity"))
            ):
                plan.skip(t, "provider.max_price: too expensive")
            elif prefill and not t.prefill:
                plan.skip(t, "does not accept an assistant prefill")
            else:
                out.append(t)
        order = provider.get("order")
        if order:
            rank = {name: i for i, name in enumerate(order)}

            def key(t: Target) -> int:
                return min(rank.get(t.provider, len(rank)), rank.get(t.route, len(rank)))

            out.sort(key=key)  # stable: the strategy's order among equals is kept
        return out

    def _healthy(self, plan: Plan, targets: list[Target]) -> list[Target]:
        if self.health is None:
            return targets
        out = []
        for t in targets:
            keys = self.key_ids.get(t.provider, [])
            if self.health.route_usable(t.route, keys):
                out.append(t)
            else:
                plan.skip(t, f"unhealthy ({self.health.route_state(t.route, keys)})")
        return out

    def _retry_after(self, targets: list[Target]) -> int:
        """Seconds until the first of these targets may be tried again (at least 1)."""
        if self.health is None:
            return 1
        now = self.health.clock()
        soonest = None
        for t in targets:
            for k in self.key_ids.get(t.provider, []) or [""]:
                b = self.health.breaker(t.route, k)
                until = max(b.open_until, b.cooldown_until)
                if until > now and (soonest is None or until < soonest):
                    soonest = until
        return max(1, int((soonest - now) + 0.999)) if soonest is not None else 1


def _describe(step: dict[str, Any]) -> str:
    provider = step["route"].split("/", 1)[0]
    why = {
        "unhealthy (refused)": "every upstream API key was refused (401/403); check the keys",
        "unhealthy (open)": "circuit open after repeated failures",
        "unhealthy (cooling)": "rate-limited upstream",
    }.get(step["skipped"], step["skipped"])
    return f"provider '{provider}' ({step['route']}): {why}"


def _loose_eq(a: Any, b: Any) -> bool:
    return a == b or (a is not None and str(a).lower() == str(b).lower())


def _has_prefill(payload: Mapping[str, Any]) -> bool:
    messages = payload.get("messages")
    return bool(messages) and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"


def _fallback_lists(payload: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
    """OpenRouter ``models`` and LiteLLM ``fallbacks``, validated."""
    out = []
    for name in ("models", "fallbacks"):
        value = payload.get(name)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidRequestError(f"'{name}' must be a list of model names.", param=name, code="invalid_type")
        out.append((name, value))
    return out


def _provider_overrides(payload: Mapping[str, Any]) -> dict[str, Any]:
    """OpenRouter's ``provider`` object, validated; unknown sub-fields are refused."""
    raw = payload.get("provider")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidRequestError("'provider' must be an object.", param="provider", code="invalid_type")
    allowed = {"order", "only", "ignore", "allow_fallbacks", "sort", "max_price"}
    unknown = set(raw) - allowed
    if unknown:
        raise InvalidRequestError(
            f"Unsupported field(s) in 'provider': {', '.join(sorted(unknown))} (supported: {', '.join(sorted(allowed))}).",
            param="provider", code="invalid_value",
        )
    out: dict[str, Any] = {}
    for key in ("order", "only", "ignore"):
        if key in raw:
            v = raw[key]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise InvalidRequestError(f"'provider.{key}' must be a list of provider names.", param=f"provider.{key}", code="invalid_type")
            out[key] = v
    if "allow_fallbacks" in raw:
        if not isinstance(raw["allow_fallbacks"], bool):
            raise InvalidRequestError("'provider.allow_fallbacks' must be a boolean.", param="provider.allow_fallbacks", code="invalid_type")
        out["allow_fallbacks"] = raw["allow_fallbacks"]
    if "sort" in raw:
        if raw["sort"] not in _OPENROUTER_SORT:
            raise InvalidRequestError(
                f"'provider.sort' must be one of {', '.join(_OPENROUTER_SORT)}.", param="provider.sort", code="invalid_value"
            )
        out["sort"] = raw["sort"]
    if "max_price" in raw:
        mp = raw["max_price"]
        if not isinstance(mp, dict) or not all(k in ("prompt", "completion") and isinstance(v, int | float) and not isinstance(v, bool) for k, v in mp.items()):
            raise InvalidRequestError(
                "'provider.max_price' must be an object with numeric 'prompt' and/or 'completion' (USD per 1M tokens).",
                param="provider.max_price", code="invalid_type",
            )
        out["max_price"] = {k: Decimal(str(v)) for k, v in mp.items()}
    return out
