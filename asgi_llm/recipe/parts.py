""":class:`BuildParts`: what the layer builders share while a recipe is built.

Every shared part is made once, by the first builder that asks for it, through a named
method (:meth:`BuildParts.sql`, :meth:`BuildParts.state_store`, …) — no builder depends on
another having run first, and nothing is passed through string keys.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from asgi_llm.endpoints import ReadinessCheck
from asgi_llm.providers.base import ProviderAdapter
from asgi_llm.providers.transport import TransportName
from asgi_llm.recipe.schema import GatewayConfig
from asgi_llm.routing.health import HealthTracker
from asgi_llm.routing.router import Router
from asgi_llm.stack import Resource, Services

if TYPE_CHECKING:
    from asgi_llm.observability.metrics import GatewayMetrics
    from asgi_llm.observability.tracing import GatewayTracer
    from asgi_llm.stores.sql import SQLDatabase
    from asgi_llm.stores.state import StateStore
    from asgi_llm.usage.accounting import Accountant
    from asgi_llm.usage.quarantine import SQLQuarantineStore
    from asgi_llm.usage.writer import BatchWriter

__all__ = ["BuildParts", "default_spill_dir"]


def default_spill_dir(ledger_url: str) -> Path:
    """``<tmp>/asgi-llm-spill/<hash of the ledger URL>``: the same for every process
    writing to one ledger on this machine, so a restart replays what a previous one spilled."""
    return Path(tempfile.gettempdir()) / "asgi-llm-spill" / hashlib.sha256(ledger_url.encode()).hexdigest()[:16]


def _memory_ledger(ledger_url: str) -> bool:
    """An in-memory SQLite ledger: nothing outlives the process, so no journal to replay."""
    return ledger_url.startswith("sqlite") and (":memory:" in ledger_url or ledger_url.rstrip("/") in ("sqlite:", "sqlite+pysqlite:"))


@dataclass
class BuildParts:
    """What layer builders share while :func:`~asgi_llm.recipe.build.build_gateway` assembles a recipe.

    A builder reads ``config``, may use ``router``/``providers``, adds what it needs opened
    at startup to ``resources`` and its health to ``readiness``, and records what it made
    in ``services`` (which becomes :attr:`Gateway.services <asgi_llm.stack.Gateway>`).
    """

    config: GatewayConfig
    router: Router
    providers: dict[str, ProviderAdapter]
    health: HealthTracker
    transport: TransportName = "auto"
    resources: list[Resource] = field(default_factory=list)
    readiness: list[ReadinessCheck] = field(default_factory=list)
    admin_routes: list[BaseRoute] = field(default_factory=list)
    node_routes: list[BaseRoute] = field(default_factory=list)
    services: Services = field(default_factory=Services)
    websocket: ASGIApp | None = None
    _observability_made: bool = field(default=False, init=False, repr=False)

    # ------------------------------------------------------------------ shared, made once

    def sql(self) -> SQLDatabase:
        """The gateway's SQLDatabase (``stores.ledger``), created once and opened at startup."""
        if self.services.sql is None:
            from asgi_llm.stores.sql import SQLDatabase

            db = self.services.sql = SQLDatabase(self.config.stores.ledger)
            self.resources.append(db)
            self.readiness.append(db.ping)
        return self.services.sql

    def state_store(self) -> StateStore:
        """The state store (``stores.state``): rate limits and budgets; made once."""
        if self.services.state is None:
            from asgi_llm.stores.state import state_store_from_url

            store = self.services.state = state_store_from_url(self.config.stores.state)
            self.resources.append(store)  # opened before whatever shares its client, closed after
        return self.services.state

    def accountant(self) -> Accountant:
        """The gateway's :class:`~asgi_llm.usage.accounting.Accountant` (``usage.prices``
        overrides, the prompt estimator, ``limits.default_max_tokens``), created once and
        given to the router."""
        if self.services.accountant is None:
            from asgi_llm.targets import Price
            from asgi_llm.usage.accounting import ESTIMATORS, Accountant, Pricer

            cfg = self.config
            pricer = Pricer({k: Price(v.input, v.output, v.cached_input) for k, v in cfg.usage.prices.items()})
            acct = self.services.accountant = Accountant(
                pricer, router=self.router, prompt_estimator=ESTIMATORS[cfg.usage.prompt_estimate],
                default_max_tokens=cfg.limits.default_max_tokens,
            )
            self.router.accountant = acct
        return self.services.accountant

    def observability(self) -> tuple[GatewayMetrics | None, GatewayTracer | None]:
        """The gateway's metrics and tracer (per ``observability`` in the recipe), made once."""
        s = self.services
        if not self._observability_made:
            from asgi_llm.observability.metrics import GatewayMetrics
            from asgi_llm.observability.tracing import GatewayTracer

            cfg = self.config.observability
            s.metrics = GatewayMetrics(models=self.config.models) if cfg.metrics else None
            s.tracer = GatewayTracer() if cfg.otel else None
            self._observability_made = True
        return s.metrics, s.tracer

    def quarantine(self) -> SQLQuarantineStore:
        """The quarantine store (on ``stores.ledger``), created once, with its admin route."""
        if self.services.quarantine_store is None:
            from asgi_llm.admin.quarantine import quarantine_routes
            from asgi_llm.usage.quarantine import SQLQuarantineStore

            store = self.services.quarantine_store = SQLQuarantineStore(self.sql())
            self.admin_routes.extend(quarantine_routes(store, self.services.writers))
        return self.services.quarantine_store

    def writer(self, name: str, *, sink: Any, encode: Any, decode: Any, normalise: Any = None,
               substitute: Any = None) -> BatchWriter[Any]:
        """A :class:`~asgi_llm.usage.writer.BatchWriter` with the recipe's ``usage:`` queue
        settings, registered as a gateway resource (the ledger and the audit log share them).
        Rows the database refuses go to the shared quarantine (:meth:`quarantine`)."""
        from asgi_llm.usage.writer import BatchWriter

        cfg = self.config.usage
        quarantine = self.quarantine()
        writer: BatchWriter[Any] = BatchWriter(
            name, sink=sink, encode=encode, decode=decode,
            spill_dir=cfg.spill_dir or default_spill_dir(self.config.stores.ledger), queue_max=cfg.queue_max,
            batch_size=cfg.batch_size, flush_interval_s=cfg.flush_interval_s, shutdown_timeout_s=cfg.shutdown_timeout_s,
            normalise=normalise, quarantine=quarantine.add, substitute=substitute,
            journal=not _memory_ledger(self.config.stores.ledger),  # a crash journal needs a ledger that outlives the process
        )
        self.resources.append(writer)
        self.services.writers.append(writer)
        return writer
