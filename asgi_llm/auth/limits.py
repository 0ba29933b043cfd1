"""Per-key limits: the option type the recipe schema and stored keys share."""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, Field

from asgi_llm._options import OPTION_MODEL_CONFIG

__all__ = ["KeyLimits"]


class KeyLimits(BaseModel):
    """Rate limits and spend quotas; unset means unlimited."""

    model_config = OPTION_MODEL_CONFIG

    rpm: int | None = Field(None, gt=0, description="requests per minute")
    tpm: int | None = Field(None, gt=0, description="tokens per minute")
    concurrency: int | None = Field(None, gt=0, description="requests in flight at once")
    spend_usd_per_day: Decimal | None = Field(None, gt=0, description="USD per UTC day")
    spend_usd_per_month: Decimal | None = Field(None, gt=0, description="USD per UTC calendar month")
