"""The live node registry: who is online, what they serve, how busy they are.

Records (name, owner org, credential hash, price, visibility, state) live in SQL and
are reloaded every heartbeat window, so an admin's cordon or revoke on one replica
reaches the others. Liveness (last heartbeat, load, open tunnel) is kept in process:
a node is routable while its last heartbeat is younger than ``window_s``, it is
``active``, not revoked, inside its availability windows, and has a way in (a URL in
direct mode, an open tunnel in tunnel mode).

Resolution is cached: :meth:`resolve` keeps, per (selector target, org), the node
targets it built, and every change that can alter the answer drops the cache — a record
put or reloaded, a node forgotten, a node coming back online or changing its agent
state, a tunnel attached or detached. What changes with time alone is checked on each
hit: the oldest heartbeat among the cached nodes (once it is older than ``window_s`` the
entry is rebuilt), the UTC minute for nodes with availability windows, and whether a
cached tunnel has closed. Keep ``records`` up to date through :meth:`put` /
:meth:`reload` (or assign the whole dict), not by editing the dict in place.

Across replicas: with ``stores.state: redis://…`` every replica publishes the
heartbeats it receives and adopts the others' (:mod:`asgi_llm.nodes.shared`), so a
direct-mode node is routable from all of them whatever replica it heartbeats to. A
tunnel node is reachable only through the replica that holds its WebSocket. Without
Redis, each replica sees only the heartbeats that reach it: use a sticky load balancer,
or ``heartbeat_window_s`` ≥ N × ``heartbeat_interval_s``.

The registry plugs into the gateway three ways: :meth:`resolve` is the router's
``node_resolver``, :meth:`extra_load` its ``extra_load`` (engine queue depth for
``least-busy``), and :class:`NodeProviders` lets the dispatcher find a node's adapter
under the provider name ``node:<name>@<org>``.

Identity: a node's provider name (and so its routes, ``node:<name>@<org>/<model>``) is
scoped by its owner org, so two orgs' ``gpu-1`` never meet; its ledger ``node`` column is
its id (:class:`NodeTarget`), so a name reused after a revoke starts a history of its own.

Tenancy: a node of another org is a candidate only when its owner shares it with the
caller's org and the caller's org accepted that owner at the node's price
(:mod:`asgi_llm.nodes.consent`). Destinations: a direct node's URL is checked against
the network policy before its adapter is built, and its transport re-checks names on
every connection (:mod:`asgi_llm.nodes.netpolicy`). A node's connection pool is closed
when its URL changes, it is forgotten, or the registry closes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from asgi_llm._background import Loops
from asgi_llm.nodes.adapter import NodeAdapter
from asgi_llm.nodes.consent import AcceptRule, accepts
from asgi_llm.nodes.netpolicy import GuardedTransport, NetworkPolicy
from asgi_llm.nodes.records import CALL_SECRET_HEADER, NodeRecord, call_secret
from asgi_llm.nodes.tunnel import TunnelConnection, TunnelTransport
from asgi_llm.providers.base import Timeouts
from asgi_llm.providers.http import REQUEST_ID_HEADER
from asgi_llm.providers.openai import OpenAIAdapter
from asgi_llm.providers.transport import TransportName, make_transport
from asgi_llm.targets import NodeTargets, Price, Target

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from asgi_llm.context import RequestContext
    from asgi_llm.nodes.store import SQLNodeStore
    from asgi_llm.providers.base import ProviderAdapter

__all__ = ["LiveNode", "NODE_PROVIDER_PREFIX", "NodeProviders", "NodeRegistry", "NodeTarget", "node_provider"]

logger = logging.getLogger("asgi_llm.nodes")

NODE_PROVIDER_PREFIX = "node:"


def node_provider(name: str, org: str) -> str:
    """The provider name a node's targets carry: ``node:<name>@<org>`` (names are per org)."""
    return f"{NODE_PROVIDER_PREFIX}{name}@{org}"


@dataclass(frozen=True, slots=True)
class NodeTarget(Target):
    """A live node target; ``node`` (the node's id) is what the ledger's ``node`` column records."""

    node: str = ""


@dataclass
class LiveNode:
    """What the gateway knows of a node between heartbeats."""

    last_seen: float = -1e18
    load: dict[str, float] = field(default_factory=dict)
    agent_state: str = "ready"
    tunnel: TunnelConnection | None = None
    adapter: OpenAIAdapter | None = None
    adapter_key: tuple[Any, ...] = ()
    transport: Any = None
    transport_key: tuple[Any, ...] = ()
    blocked: bool = False
    """The network policy refused the node's URL (no adapter until it changes)."""


@dataclass(slots=True)
class _Resolved:
    """One cached answer of :meth:`NodeRegistry.resolve` and what keeps it current."""

    targets: list[Target]
    built_at: float
    """``clock()`` when built (a clock that went back invalidates the entry)."""
    oldest_seen: float
    """The oldest last heartbeat among the nodes in ``targets`` (``inf`` when none)."""
    window_s: float
    wall_from: float
    wall_until: float
    """``time.time()`` bounds: the UTC minute of the build when a candidate node has
    availability windows (``-inf``/``inf`` otherwise)."""
    tunnels: tuple[TunnelConnection, ...]
    """The open tunnels of the tunnel-mode nodes in ``targets``."""


_RESOLVED_MAX = 4096
"""Cached (selector, org) answers kept at most; past that the cache starts over."""


class NodeRegistry:
    """Node records (from SQL) plus liveness (in process).

    Args:
        store: the SQL node store.
        pepper: returns the pepper (the key ring's, known once it started).
        window_s: a node silent this long leaves routing.
        timeouts: per-attempt limits for node targets.
        transport: which HTTP transport direct-mode adapters use.
        clock: monotonic seconds (inject one in tests).
        policy: where direct-mode nodes may be reached (default: the built-in deny list).
        accept_shared: the recipe's consents (consumer org → rules); org admins' own
            are loaded from the store on :meth:`reload`.
        request_id_header: the header carrying the request id to nodes (``None``: none).
    """

    def __init__(
        self,
        store: SQLNodeStore,
        *,
        pepper: Callable[[], bytes | None],
        window_s: float = 15.0,
        interval_s: float = 5.0,
        timeouts: Timeouts | None = None,
        transport: TransportName = "auto",
        clock: Callable[[], float] = time.monotonic,
        health: Any = None,
        policy: NetworkPolicy | None = None,
        accept_shared: dict[str, tuple[AcceptRule, ...]] | None = None,
        request_id_header: str | None = REQUEST_ID_HEADER,
    ) -> None:
        self.store = store
        self._pepper = pepper
        self.window_s = window_s
        self.interval_s = interval_s
        self.timeouts = timeouts or Timeouts(connect=3, attempt=120, ttft=60, idle=60)
        self.transport: TransportName = transport
        self.clock = clock
        self.health = health
        self.policy = policy or NetworkPolicy()
        self.recipe_consents: dict[str, tuple[AcceptRule, ...]] = dict(accept_shared or {})
        self._org_consents: dict[str, tuple[AcceptRule, ...]] = {}
        self.request_id_header = request_id_header
        self._records: dict[str, NodeRecord] = {}
        self._by_name: dict[tuple[str, str], str] | None = None  # (org, name) → id of the node holding it
        self._task_group: TaskGroup | None = None
        self._retired: list[Any] = []  # connection pools to close (built before a task group existed)
        self._loops = Loops("node registry")
        self._sorted: list[NodeRecord] | None = None  # records by name
        self._resolved: dict[tuple[Any, str], _Resolved] = {}
        self._by_provider: dict[str, LiveNode] | None = None  # ``node:<name>@<org>`` → its liveness
        self.live: dict[str, LiveNode] = {}
        self.on_heartbeat: Callable[[NodeRecord, LiveNode], None] | None = None
        """Called after each heartbeat this replica receives (to share liveness)."""

    @property
    def records(self) -> dict[str, NodeRecord]:
        """Node id → record."""
        return self._records

    @records.setter
    def records(self, records: dict[str, NodeRecord]) -> None:
        self._records = records
        self._by_name = None
        self._sorted = None
        self._changed()

    def _changed(self) -> None:
        """Something that can change :meth:`resolve`'s answer (or which liveness a name
        leads to) happened: drop the caches."""
        self._resolved.clear()
        self._by_provider = None

    # ----------------------------------------------------------------- lifecycle

    async def start(self, task_group: TaskGroup) -> None:
        self._task_group = task_group
        await self.reload()
        self._loops.start(task_group, self._refresh_loop)

    async def aclose(self) -> None:
        await self._loops.stop()  # no reload once the SQL store may be closing
        self._task_group = None
        for live in self.live.values():
            if live.transport is not None:
                await live.transport.aclose()
            if live.tunnel is not None:
                live.tunnel.close()
        self.live.clear()
        retired, self._retired = self._retired, []
        for transport in retired:
            await transport.aclose()
        self._changed()

    def _retire(self, transport: Any) -> None:
        """Close a connection pool nobody uses any more (in the background once started)."""
        if self._task_group is not None:
            self._task_group.start_soon(_close_quietly, transport)
        else:
            self._retired.append(transport)

    # ----------------------------------------------------------------- consents

    def consents(self, org: str) -> tuple[AcceptRule, ...]:
        """``org``'s acceptance of shared nodes: the recipe's rules plus its admin's."""
        return self.recipe_consents.get(org, ()) + self._org_consents.get(org, ())

    def org_consents(self, org: str) -> tuple[AcceptRule, ...]:
        """The rules ``org``'s admin set (without the recipe's)."""
        return self._org_consents.get(org, ())

    def set_org_consents(self, org: str, rules: tuple[AcceptRule, ...]) -> None:
        """Adopt ``org``'s admin-set rules (after the SQL write, or on reload)."""
        if self._org_consents.get(org, ()) != rules:
            if rules:
                self._org_consents[org] = rules
            else:
                self._org_consents.pop(org, None)
            self._changed()

    def may_use(self, record: NodeRecord, org: str) -> bool:
        """May requests of ``org`` be routed to ``record``? Its own org always; another org
        when the owner shares the node with it and it accepted the owner at the node's price."""
        if org == record.org:
            return True
        return record.visible_to(org) and accepts(self.consents(org), record.org, record.price_decimal())

    async def _refresh_loop(self) -> None:
        while True:
            await anyio.sleep(self.window_s)
            try:
                await self.reload()
            except Exception:  # noqa: BLE001 - a store hiccup must not stop routing
                logger.exception("node registry: reload from the SQL store failed")

    async def reload(self) -> None:
        """Re-read every node record (admin changes made on other replicas)."""
        fresh = {r.id: r for r in await self.store.list()}
        list_consents = getattr(self.store, "list_consents", None)
        if list_consents is not None:
            from asgi_llm.nodes.consent import parse_rules

            stored = await list_consents()
            for org in set(self._org_consents) | set(stored):
                try:
                    rules = parse_rules(stored.get(org, []))
                except Exception:  # noqa: BLE001 - a row written by hand: ignore it, loudly
                    logger.warning("node registry: ignoring invalid stored consents of org %r", org)
                    rules = ()
                self.set_org_consents(org, rules)
        self.records = fresh
        for node_id in [n for n in self.live if n not in fresh or fresh[n].revoked_at is not None]:
            await self.forget(node_id)

    def pepper(self) -> bytes:
        pepper = self._pepper()
        if pepper is None:
            from asgi_llm.errors import ServiceUnavailableError

            raise ServiceUnavailableError("Node enrollment needs the key store's pepper, which is not loaded yet.")
        return pepper

    # ----------------------------------------------------------------- state

    def put(self, record: NodeRecord) -> None:
        """Record a new or changed node (after the SQL write)."""
        old = self._records.get(record.id)
        self._records[record.id] = record
        if old is record:
            return
        if old is None or old.name != record.name or old.org != record.org or old.revoked_at != record.revoked_at:
            self._by_name = None
        self._sorted = None
        if old is None or old != record:
            self._changed()

    async def forget(self, node_id: str) -> None:
        """Drop a node's liveness: close its tunnel and its connection pool."""
        live = self.live.pop(node_id, None)
        if live is None:
            return
        self._changed()
        if live.tunnel is not None:
            live.tunnel.close()
        if live.transport is not None:
            await live.transport.aclose()

    def heartbeat(self, record: NodeRecord, *, load: dict[str, float], agent_state: str) -> LiveNode:
        """Note a heartbeat: the node is alive now, with this load."""
        came_back = not self.is_online(record.id)
        live = self.live.setdefault(record.id, LiveNode())
        now = self.clock()
        if came_back or now < live.last_seen or live.agent_state != agent_state:
            self._changed()
        live.last_seen = now
        if came_back and self.health is not None:
            # A node that was away may have tripped its breakers while dying; its return
            # is as good as a passed probe (half-open: the next request tries it).
            for m in record.models:
                self.health.probe_result(f"{node_provider(record.name, record.org)}/{m.get('id')}", True)
        live.load = load
        live.agent_state = agent_state
        self._ensure_adapter(record, live)
        if self.on_heartbeat is not None:
            self.on_heartbeat(record, live)
        return live

    def observe_remote(self, node_id: str, *, age_s: float, load: dict[str, float], agent_state: str) -> bool:
        """Adopt a heartbeat another replica received ``age_s`` seconds ago.

        Only direct-mode nodes: a tunnel ends at the replica that holds it, so only that
        replica can route to it. Returns False when the record is not known here yet
        (the caller reloads records).
        """
        record = self.records.get(node_id)
        if record is None:
            return False
        if record.mode == "tunnel" or record.revoked_at is not None:
            return True
        seen = self.clock() - max(0.0, age_s)
        live = self.live.get(node_id)
        if live is not None and live.last_seen >= seen:
            return True  # we heard from it ourselves, more recently
        came_back = not self.is_online(node_id)
        live = self.live.setdefault(node_id, LiveNode())
        if came_back or seen < live.last_seen or live.agent_state != agent_state:
            self._changed()
        live.last_seen, live.load, live.agent_state = seen, load, agent_state
        if came_back and self.health is not None:
            for m in record.models:
                self.health.probe_result(f"{node_provider(record.name, record.org)}/{m.get('id')}", True)
        self._ensure_adapter(record, live)
        return True

    def attach_tunnel(self, record: NodeRecord, conn: TunnelConnection) -> None:
        live = self.live.setdefault(record.id, LiveNode())
        old, live.tunnel = live.tunnel, conn
        if old is not None and old is not conn:
            old.close()
        live.last_seen = self.clock()  # a fresh tunnel is a sign of life
        self._changed()
        self._ensure_adapter(self.records.get(record.id, record), live)

    def detach_tunnel(self, record: NodeRecord, conn: TunnelConnection) -> None:
        live = self.live.get(record.id)
        if live is not None and live.tunnel is conn:
            live.tunnel = None
            self._changed()

    def _ensure_adapter(self, record: NodeRecord, live: LiveNode) -> None:
        """Build (or keep) the node's adapter. The connection pool is kept across a
        credential rotation and closed when the URL or mode changes; a direct URL the
        network policy refuses gets no adapter (the node is skipped, not called)."""
        key = (record.mode, record.url, record.credential_hash, record.name, record.org)
        if live.adapter_key == key and (live.adapter is not None or live.blocked):
            return
        transport_key = (record.mode, record.url)
        if live.transport is not None and live.transport_key != transport_key:
            self._retire(live.transport)
            live.transport, live.adapter = None, None
        base_url = "http://tunnel/v1"
        if record.mode != "tunnel":
            why = "no URL" if not record.url else self.policy.check_literal(record.url)
            if why is not None:
                if live.adapter is not None:
                    self._changed()
                live.adapter, live.adapter_key, live.blocked = None, key, True
                logger.warning("node %s of org %s: not calling its URL (%s)", record.name, record.org, why)
                return
            base_url = str(record.url).rstrip("/")
        if live.transport is None:
            if record.mode == "tunnel":
                node_id = record.id
                live.transport = TunnelTransport(lambda: self._tunnel(node_id), name=record.name)
            else:
                live.transport = GuardedTransport(make_transport(self.transport, connect_timeout=self.timeouts.connect),
                                                  self.policy, name=record.name)
            live.transport_key = transport_key
        secret = call_secret(self.pepper(), record.id, record.credential_hash)
        live.adapter = NodeAdapter(node_provider(record.name, record.org), base_url=base_url, timeouts=self.timeouts,
                                   headers={CALL_SECRET_HEADER: secret}, transport=live.transport,
                                   request_id_header=self.request_id_header)
        live.adapter_key, live.blocked = key, False
        self._changed()

    def _tunnel(self, node_id: str) -> TunnelConnection | None:
        live = self.live.get(node_id)
        return live.tunnel if live is not None else None

    # ----------------------------------------------------------------- queries

    def is_online(self, node_id: str) -> bool:
        live = self.live.get(node_id)
        return live is not None and self.clock() - live.last_seen <= self.window_s

    def status(self, record: NodeRecord) -> str:
        """``revoked`` / ``offline`` / ``cordoned`` / ``draining`` / ``paused`` (outside its
        availability) / ``blocked`` (its URL is outside the network policy) / ``online``."""
        if record.revoked_at is not None:
            return "revoked"
        if not self.is_online(record.id):
            return "offline"
        if record.state != "active":
            return record.state
        live = self.live[record.id]
        if live.agent_state == "draining":
            return "draining"
        if record.mode == "tunnel" and (live.tunnel is None or live.tunnel.closed):
            return "offline"
        if live.adapter is None:
            return "blocked"  # its URL is refused by the network policy (see the log)
        if not record.available_at():
            return "paused"
        return "online"

    def routable(self, record: NodeRecord) -> bool:
        return self.status(record) == "online"

    def advertised(self, org: str | None) -> set[str]:
        """Model names that online nodes usable by ``org`` advertise (``None``: any org's).
        The router's ``auto_models`` hook (point-and-enroll)."""
        names: set[str] = set()
        for record in self._records.values():
            if (org is not None and not self.may_use(record, org)) or not self.routable(record):
                continue
            for m in record.models:
                name = m.get("id") if isinstance(m, dict) else None
                if isinstance(name, str) and 0 < len(name) <= 200 and name.isprintable():
                    names.add(name)
        return names

    def describe(self, record: NodeRecord) -> dict[str, Any]:
        """A record's public JSON plus its live status and load."""
        live = self.live.get(record.id)
        out = record.public()
        out["status"] = self.status(record)
        out["load"] = dict(live.load) if live is not None else {}
        out["seconds_since_heartbeat"] = round(self.clock() - live.last_seen, 3) if live is not None and live.last_seen > 0 else None
        return out

    def _name_index(self) -> dict[tuple[str, str], str]:
        index = self._by_name
        if index is None:
            index = {}
            for r in self._records.values():
                held = index.get((r.org, r.name))
                if held is None or (r.revoked_at is None and self._records[held].revoked_at is not None):
                    index[(r.org, r.name)] = r.id
            self._by_name = index
        return index

    def by_name(self, name: str, org: str) -> NodeRecord | None:
        """The node of ``org`` called ``name`` (the one not revoked, if any)."""
        node_id = self._name_index().get((org, name))
        return self._records.get(node_id) if node_id is not None else None

    def _live_by_provider(self, provider: str) -> LiveNode | None:
        """The liveness of the node behind ``node:<name>@<org>`` (that of :meth:`by_name`)."""
        index = self._by_provider
        if index is None:
            index = {}
            for (org, name), node_id in self._name_index().items():
                live = self.live.get(node_id)
                if live is not None:
                    index[node_provider(name, org)] = live
            self._by_provider = index
        return index.get(provider)

    def resolve(self, spec: NodeTargets, ctx: RequestContext) -> list[Target]:
        """The router's ``node_resolver``: the routable nodes that match ``spec``'s selector,
        serve its model, and are visible to the caller's org, in name order.

        Cached per (``spec``, org) until the registry changes or time alone could change
        the answer (see the module docstring); a hit costs a few dict lookups and a copy.
        """
        org = ctx.principal.org
        try:
            key = (spec, org)
            entry = self._resolved.get(key)
        except TypeError:  # an unhashable selector target: no caching
            return self._build(spec, org).targets
        if entry is not None:
            now = self.clock()
            if (
                entry.built_at <= now
                and now - entry.oldest_seen <= self.window_s
                and entry.window_s == self.window_s
                and (entry.wall_until == math.inf or entry.wall_from <= time.time() < entry.wall_until)
                and not any(conn.closed for conn in entry.tunnels)
            ):
                return list(entry.targets)
        entry = self._build(spec, org)
        if len(self._resolved) >= _RESOLVED_MAX:
            self._resolved.clear()
        self._resolved[key] = entry
        return list(entry.targets)

    def _build(self, spec: NodeTargets, org: str) -> _Resolved:
        """Resolve ``spec`` for ``org`` from scratch, noting what keeps the answer current."""
        ordered = self._sorted
        if ordered is None:
            ordered = self._sorted = sorted(self._records.values(), key=lambda r: r.name)
        out: list[Target] = []
        built_at, oldest, tunnels = self.clock(), math.inf, []
        wall_from, wall_until, wall_now = -math.inf, math.inf, time.time()
        for record in ordered:
            if not self.may_use(record, org) or not _matches(spec.selector, record):
                continue
            if not any(m.get("id") == spec.model for m in record.models):
                continue
            if (record.availability or {}).get("mode", "always") not in ("always", "paused"):
                # available_at() reads the UTC minute: the answer holds until the next one.
                wall_from = math.floor(wall_now / 60) * 60.0
                wall_until = wall_from + 60.0
            if not self.routable(record):
                continue
            live = self.live[record.id]
            oldest = min(oldest, live.last_seen)
            if record.mode == "tunnel" and live.tunnel is not None:
                tunnels.append(live.tunnel)
            price = spec.price
            owner_price = record.price_decimal()
            if owner_price is not None:
                price = Price(owner_price[0], owner_price[1])
            window = next((m.get("context_length") for m in record.models if m.get("id") == spec.model), None)
            out.append(NodeTarget(
                provider=node_provider(record.name, record.org), model=spec.model, price=price, weight=spec.weight,
                context_window=spec.context_window or (window if isinstance(window, int) else None),
                prefill=spec.prefill, kind="node", node=record.id,
            ))
        return _Resolved(out, built_at, oldest, self.window_s, wall_from, wall_until, tuple(tunnels))

    def extra_load(self, target: Target) -> float:
        """Engine signals for ``least-busy``: requests queued at the engine, plus KV-cache use."""
        if target.kind != "node":
            return 0.0
        live = self._live_by_provider(target.provider)
        if live is None:
            return 0.0
        load = live.load
        return float(load.get("queue_depth", 0.0)) + float(load.get("kv_cache_usage", 0.0))

    def adapter(self, provider: str) -> ProviderAdapter | None:
        if not provider.startswith(NODE_PROVIDER_PREFIX):
            return None
        live = self._live_by_provider(provider)
        return live.adapter if live is not None else None  # type: ignore[return-value]


def _matches(selector: str, record: NodeRecord) -> bool:
    """``any``; ``name:<n>`` or a bare name; ``label:k=v[,k=v…]`` (every pair must match)."""
    selector = selector.strip()
    if selector in ("any", "*"):
        return True
    if selector.startswith("label:") or selector.startswith("labels:"):
        pairs = selector.split(":", 1)[1].split(",")
        for pair in pairs:
            k, _, v = pair.partition("=")
            if record.labels.get(k.strip()) != v.strip():
                return False
        return True
    if selector.startswith("name:"):
        selector = selector[5:]
    return record.name in {s.strip() for s in selector.split(",")}


async def _close_quietly(transport: Any) -> None:
    try:
        await transport.aclose()
    except Exception:  # noqa: BLE001 - closing a dead pool must not take the registry down
        logger.warning("node registry: closing a retired connection pool failed", exc_info=True)


class NodeProviders(dict):  # type: ignore[type-arg]
    """The dispatcher's provider table: the recipe's providers, then live node adapters
    by ``node:<name>@<org>``. Iterating sees the recipe's providers only (probes, shutdown)."""

    def __init__(self, static: dict[str, Any], registry: NodeRegistry) -> None:
        super().__init__(static)
        self.registry = registry

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        found = super().get(key)
        if found is not None:
            return found
        found = self.registry.adapter(key)
        return default if found is None else found

    def __missing__(self, key: str) -> Any:
        found = self.registry.adapter(key)
        if found is None:
            raise KeyError(key)
        return found


