"""Usage metering: the ledger (one row per attempt), its batch writer, pricing and reports.

* :mod:`~asgi_llm.usage.records` — :class:`LedgerRow`, what one attempt costs.
* :mod:`~asgi_llm.usage.accounting` — token estimates, prices (recipe, overrides, then
  ``genai-prices``, offline) and per-attempt charges: the one place money is computed,
  shared by the router, the quota layer and the ledger.
* :mod:`~asgi_llm.usage.writer` — :class:`BatchWriter`: bounded queue, batched inserts,
  retries, spill-to-disk, flush at shutdown; bisects a refused batch and quarantines the bad rows.
* :mod:`~asgi_llm.usage.store` — :class:`SQLLedgerStore` (SQLite / PostgreSQL) and reports.
* :mod:`~asgi_llm.usage.failures` — outage or data error; :class:`QuarantineEntry`.
* :mod:`~asgi_llm.usage.quarantine` — where the writers keep rows the database refused.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Accountant", "BatchWriter", "LedgerRow", "LedgerStore", "PriceQuote", "Pricer", "SQLLedgerStore"]

_LAZY = {"Accountant": "accounting", "BatchWriter": "writer", "LedgerRow": "records", "LedgerStore": "store", "PriceQuote": "accounting",
         "Pricer": "accounting", "SQLLedgerStore": "store"}


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not import SQLAlchemy (``import asgi_llm`` needs no driver).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"asgi_llm.usage.{_LAZY[name]}"), name)
    raise AttributeError(name)
