"""The audit log: one event per inference and admin request, hash-chained.

* :mod:`~asgi_llm.audit.chain` — :class:`AuditEvent`, canonical form, hashes, verification.
* :mod:`~asgi_llm.audit.store` — :class:`SQLAuditStore`: appends batches to one chain
  (also across replicas), queries, verifies.
"""

from __future__ import annotations

from typing import Any

from asgi_llm.audit.chain import GENESIS, AuditEvent, ChainBreak, VerifyResult, event_hash

__all__ = ["GENESIS", "AuditEvent", "ChainBreak", "SQLAuditStore", "VerifyResult", "event_hash"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not import SQLAlchemy.
    if name == "SQLAuditStore":
        from asgi_llm.audit.store import SQLAuditStore

        return SQLAuditStore
    raise AttributeError(name)
