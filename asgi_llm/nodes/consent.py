"""Consent to shared capacity: which owners' shared nodes an org accepts, up to which price.

Sharing is two-sided. An owner shares a node (``shared_with: [<org>, …]``; ``["*"]`` —
every org — needs the recipe admin). A consuming org is routed to another org's node
only when it accepted that owner at that price:

* in the recipe — ``nodes.accept_shared: {<consumer org>: [{owner: <org> | "*",
  max_price: {input: <USD/1M>, output: <USD/1M>}}]}``;
* by its own org admin — ``PUT /admin/node-acceptance`` ``{"accept": [{"owner", "max_price"}]}``
  (a recipe admin names the ``org``), stored in SQL and shared by every replica.

An org's acceptance is the union of both. A shared node serves the consumer when one of
its rules names the node's owner (or ``"*"``) and the node's price (USD per 1M tokens;
none = 0) is at most that rule's ``max_price`` on input **and** output: a node priced
above what the consumer accepted is not used, so the consumer never pays more than it
agreed to. The owner's own nodes need no consent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from asgi_llm.errors import InvalidRequestError

__all__ = ["AcceptRule", "MAX_RULES", "accepts", "parse_rules"]

MAX_RULES = 100
_MAX_ORG = 200


@dataclass(frozen=True, slots=True)
class AcceptRule:
    """One consent: nodes of ``owner`` (``"*"`` = any owner) up to ``max_price``."""

    owner: str
    max_input: Decimal
    max_output: Decimal

    def public(self) -> dict[str, Any]:
        """The JSON form (prices as strings, like node prices)."""
        return {"owner": self.owner, "max_price": {"input": str(self.max_input), "output": str(self.max_output)}}


def parse_rules(raw: Any, *, param: str = "accept") -> tuple[AcceptRule, ...]:
    """Validate a list of ``{owner, max_price: {input, output}}`` (admin API or store)."""
    from asgi_llm.nodes.inputs import parse_price

    if not isinstance(raw, list) or len(raw) > MAX_RULES:
        raise InvalidRequestError(f"'{param}' must be a list of at most {MAX_RULES} "
                                  "{\"owner\": <org>|\"*\", \"max_price\": {\"input\", \"output\"}} objects.", param=param)
    out = []
    for i, rule in enumerate(raw):
        if not isinstance(rule, dict) or set(rule) - {"owner", "max_price"}:
            raise InvalidRequestError(f"'{param}[{i}]' must be {{\"owner\", \"max_price\"}}.", param=f"{param}[{i}]")
        owner = rule.get("owner")
        if not isinstance(owner, str) or not owner or len(owner) > _MAX_ORG or not owner.isprintable():
            raise InvalidRequestError(f"'{param}[{i}].owner' must be an org name or \"*\".", param=f"{param}[{i}].owner")
        if "max_price" not in rule:
            raise InvalidRequestError(f"'{param}[{i}].max_price' is required: say the most you accept to pay "
                                      "(USD per 1M tokens, input and output).", param=f"{param}[{i}].max_price")
        price = parse_price(rule["max_price"], param=f"{param}[{i}].max_price")
        out.append(AcceptRule(owner, Decimal(price["input"]), Decimal(price["output"])))
    return tuple(out)


def accepts(rules: Iterable[AcceptRule], owner: str, price: tuple[Decimal, Decimal] | None) -> bool:
    """Does one of ``rules`` accept a node of ``owner`` at ``price`` (``None`` = free)?"""
    pin, pout = price if price is not None else (Decimal(0), Decimal(0))
    return any(r.owner in ("*", owner) and pin <= r.max_input and pout <= r.max_output for r in rules)


def recipe_rules(config: Mapping[str, Any]) -> dict[str, tuple[AcceptRule, ...]]:
    """``nodes.accept_shared`` (already validated by the config) as rules per consumer org."""
    out: dict[str, tuple[AcceptRule, ...]] = {}
    for org, rules in config.items():
        out[org] = tuple(AcceptRule(r.owner, r.max_price.input, r.max_price.output) for r in rules)
    return out
