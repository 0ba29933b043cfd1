"""The pydantic settings every recipe option model shares (the schema's and the features' own)."""

from __future__ import annotations

from pydantic import ConfigDict

__all__ = ["OPTION_MODEL_CONFIG"]

OPTION_MODEL_CONFIG = ConfigDict(
    extra="forbid",
    frozen=True,
    hide_input_in_errors=True,  # never print a (possibly secret) value in a ValidationError
    allow_inf_nan=False,  # timeouts, prices and weights are finite numbers
)
