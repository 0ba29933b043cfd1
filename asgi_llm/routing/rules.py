"""Routing rules: the option type the recipe schema (``routing.rules``) and the router share."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from asgi_llm._options import OPTION_MODEL_CONFIG

__all__ = ["RoutingRule", "RuleMatch"]

_MODEL_CONFIG = OPTION_MODEL_CONFIG


class RuleMatch(BaseModel):
    """When a routing rule applies: every given condition must hold (lists: any of)."""

    model_config = _MODEL_CONFIG

    org: list[str] | None = Field(None, description="caller's org is one of these")
    key: list[str] | None = Field(None, description="caller's key id or name is one of these")
    model: list[str] | None = Field(None, description="public model is one of these")
    header: dict[str, str] | None = Field(None, description="request headers equal (names case-insensitive)")
    metadata: dict[str, str | int | float | bool] | None = Field(None, description="request `metadata` fields equal")


class RoutingRule(BaseModel):
    """A routing rule: when ``match`` holds, choose a strategy and/or filter targets."""

    model_config = _MODEL_CONFIG

    name: str | None = Field(None, description="shown in plan explanations")
    match: RuleMatch = Field(default_factory=RuleMatch)
    strategy: Literal["priority", "weighted", "cheapest", "fastest", "least-busy"] | None = None
    only: list[str] | None = Field(None, description="keep only targets whose provider (or route, or 'nodes') is listed")
    exclude: list[str] | None = Field(None, description="drop targets whose provider (or route, or 'nodes') is listed")
    allow_fallbacks: bool | None = Field(None, description="false: only the first target is tried")
