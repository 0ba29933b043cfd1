"""Stores: small Protocols, one implementation per backend, chosen by URL.

| role | embedded default | shared, multi-replica |
|---|---|---|
| state (counters, reservations, breakers, node registry) | ``memory://`` | ``redis://`` |
| cache | ``memory://`` | ``redis://`` |
| ledger, audit, keys, nodes | ``sqlite:///path.db`` | ``postgresql://…`` |

Drivers are imported lazily: ``import asgi_llm`` needs neither redis nor a SQL driver.
"""

from __future__ import annotations

from asgi_llm.errors import ServiceUnavailableError

__all__ = ["StoreError"]


class StoreError(ServiceUnavailableError):
    """A store could not be reached or failed; callers decide whether to buffer, fail
    open or fail closed. Raised from the store seam with the driver's exception chained."""

    code = "store_unavailable"
