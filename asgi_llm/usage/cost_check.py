"""The demo's cost comparison: read the route comparison for given requests from the ledger.

Used by ``asgi-llm demo`` (smoke check 3), whose gateway has no admin key: the check
reads the same report the admin API serves (``/admin/usage/compare``), straight from
the demo's SQLite ledger.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

__all__ = ["compare_demo_routes"]


def compare_demo_routes(ledger_url: str, request_ids: list[str], *, expect_routes: int, timeout_s: float = 10) -> list[dict[str, Any]]:
    """Wait until the requests are in the ledger (writes are batched), then compare their routes."""
    from asgi_llm.stores.sql import SQLDatabase
    from asgi_llm.usage.store import SQLLedgerStore

    async def run() -> list[dict[str, Any]]:
        db = SQLDatabase(ledger_url, migrate=False)
        store = SQLLedgerStore(db)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                found = [r for rid in request_ids for r in await store.rows(request_id=rid)]
                hashes = {r["prompt_hash"] for r in found}
                if len(found) >= len(request_ids) and len(hashes) == 1:
                    rows = await store.compare_routes(prompt_hash=hashes.pop(), min_routes=expect_routes)
                    if len(rows) >= expect_routes:
                        return rows
                if time.monotonic() > deadline:
                    raise AssertionError(f"the ledger shows {len(found)} of {len(request_ids)} requests after {timeout_s}s")
                await anyio.sleep(0.1)
        finally:
            await db.aclose()

    return anyio.run(run)
