"""Node operations shared by the node API, the admin API and the tunnel endpoint:
enrollment, credential checks, heartbeats, rotation, cordon/drain/revoke."""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from asgi_llm.errors import AuthenticationError, InvalidRequestError, NotFoundError
from asgi_llm.nodes.records import (
    CREDENTIAL_PREFIX,
    TOKEN_PREFIX,
    EnrollmentToken,
    NodeRecord,
    call_secret,
    new_id,
    new_secret,
    secret_hash,
)

if TYPE_CHECKING:
    from asgi_llm.config import NodesConfig
    from asgi_llm.nodes.registry import NodeRegistry
    from asgi_llm.nodes.store import SQLNodeStore

__all__ = ["NAME_RE", "NodeConflictError", "NodeService"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_MAX_SECRET = 256


class NodeConflictError(InvalidRequestError):
    """The node name is taken."""

    status_code = 409
    code = "node_name_taken"


class NodeService:
    """Everything the node and admin endpoints do, in one place.

    Args:
        store: node records and tokens (SQL).
        registry: liveness and routing.
        config: the recipe's ``nodes`` section.
        reserved_names: names a node may not take (the recipe's provider names).
        clock: seconds since the epoch.
    """

    def __init__(self, store: SQLNodeStore, registry: NodeRegistry, config: NodesConfig, *,
                 reserved_names: set[str] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.registry = registry
        self.config = config
        self.reserved = set(reserved_names or ())
        self.clock = clock

    # ----------------------------------------------------------------- tokens

    async def create_token(self, *, org: str, ttl_s: float | None, defaults: dict[str, Any],
                           created_by: str | None) -> tuple[str, EnrollmentToken]:
        ttl = self.config.token_ttl_s if ttl_s is None else ttl_s
        if ttl > self.config.max_token_ttl_s:
            raise InvalidRequestError(f"ttl_s may be at most {self.config.max_token_ttl_s:g} s.", param="ttl_s")
        secret = new_secret(TOKEN_PREFIX)
        now = self.clock()
        token = EnrollmentToken(id=new_id("ent_"), hash=secret_hash(self.registry.pepper(), secret), org=org,
                                expires_at=now + ttl, defaults=defaults, created_at=now, created_by=created_by)
        await self.store.create_token(token)
        return secret, token

    # ----------------------------------------------------------------- enrollment

    async def enroll(self, token: str | None, body: dict[str, Any]) -> dict[str, Any]:
        """Exchange an enrollment token for a node credential (201 body)."""
        if not token or not token.startswith(TOKEN_PREFIX) or len(token) > _MAX_SECRET:
            raise AuthenticationError("Enrollment needs a valid enrollment token (ent-llm-…).", code="invalid_enrollment_token")
        name = body.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidRequestError("'name' must be 1-63 letters, digits, '.', '_' or '-'.", param="name")
        if name in self.reserved:
            raise NodeConflictError(f"The name {name!r} belongs to a provider of this gateway; choose another.", code="node_name_taken")
        mode, url = _mode_url(body)
        models = _models(body.get("models"))
        taken = self.registry.by_name(name)
        if taken is not None and taken.revoked_at is None:
            # Checked before the token is spent, so a clash costs the operator nothing.
            raise NodeConflictError(f"A node named {name!r} is already enrolled; pick another --name.")
        pepper = self.registry.pepper()
        node_id = new_id("node_")
        now = self.clock()
        record_token, problem = await self.store.consume_token(secret_hash(pepper, token), node_id=node_id, at=now)
        if record_token is None:
            message = {
                "used": "This enrollment token was already used; ask an admin for a new one.",
                "expired": "This enrollment token has expired; ask an admin for a new one.",
            }.get(problem or "", "Unknown enrollment token.")
            raise AuthenticationError(message, code=f"enrollment_token_{problem}")
        defaults = record_token.defaults
        credential = new_secret(CREDENTIAL_PREFIX)
        cred_hash = secret_hash(pepper, credential)
        labels = {**defaults.get("labels", {}), **_labels(body.get("labels"))}
        record = NodeRecord(
            id=node_id, name=name, org=record_token.org, credential_hash=cred_hash, mode=mode, url=url,
            labels=labels, models=models, price=_price(body.get("price")) or defaults.get("price"),
            shared_with=tuple(defaults.get("shared_with", ())), availability=defaults.get("availability") or {"mode": "always"},
            created_at=now, last_seen_at=now, created_by=record_token.created_by or record_token.id,
        )
        try:
            await self.store.create_node(record)
        except ValueError as exc:
            raise NodeConflictError(f"{exc}; pick another --name (the token stays used).", code="node_name_taken") from None
        self.registry.put(record)
        return {**self._credentials(record, credential), "node": record.public()}

    def _credentials(self, record: NodeRecord, credential: str) -> dict[str, Any]:
        return {
            "node_id": record.id, "name": record.name, "org": record.org, "credential": credential,
            "call_secret": call_secret(self.registry.pepper(), record.id, record.credential_hash),
            "heartbeat_interval_s": self.config.heartbeat_interval_s,
            "heartbeat_window_s": self.config.heartbeat_window_s,
        }

    async def authenticate(self, credential: str | None) -> NodeRecord:
        """The node a credential belongs to; 401 for unknown or revoked credentials."""
        if not credential or not credential.startswith(CREDENTIAL_PREFIX) or len(credential) > _MAX_SECRET:
            raise AuthenticationError("This endpoint needs a node credential (nc-llm-…).", code="invalid_node_credential")
        digest = secret_hash(self.registry.pepper(), credential)
        record = await self.store.get_by_credential(digest)
        if record is None or not hmac.compare_digest(record.credential_hash, digest):
            raise AuthenticationError("Unknown node credential.", code="invalid_node_credential")
        if record.revoked_at is not None:
            raise AuthenticationError("This node's credential has been revoked.", code="node_revoked")
        return record

    async def try_authenticate(self, credential: str | None) -> NodeRecord | None:
        try:
            return await self.authenticate(credential)
        except AuthenticationError:
            return None

    async def heartbeat(self, record: NodeRecord, body: dict[str, Any]) -> dict[str, Any]:
        """Note the node alive with its load; update what it advertises when it changed."""
        changes: dict[str, Any] = {}
        if "models" in body:
            models = _models(body["models"])
            if models != record.models:
                changes["models"] = models
        if "mode" in body or "url" in body:
            mode, url = _mode_url(body)
            if (mode, url) != (record.mode, record.url):
                changes["mode"], changes["url"] = mode, url
        now = self.clock()
        if changes or record.last_seen_at is None or now - record.last_seen_at > 60:
            record = record.with_(**changes, last_seen_at=now)
            await self.store.update(record)
        self.registry.put(record)
        load = body.get("load") if isinstance(body.get("load"), dict) else {}
        clean = {k: float(v) for k, v in load.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        agent_state = "draining" if body.get("status") == "draining" else "ready"
        self.registry.heartbeat(record, load=clean, agent_state=agent_state)
        return {"object": "node.heartbeat", "node_id": record.id, "state": record.state,
                "status": self.registry.status(record), "heartbeat_interval_s": self.config.heartbeat_interval_s,
                "heartbeat_window_s": self.config.heartbeat_window_s}

    async def rotate(self, record: NodeRecord) -> dict[str, Any]:
        """A new credential (and call secret); the old one stops working at once."""
        credential = new_secret(CREDENTIAL_PREFIX)
        record = record.with_(credential_hash=secret_hash(self.registry.pepper(), credential), rotated_at=self.clock())
        await self.store.update(record)
        self.registry.put(record)
        live = self.registry.live.get(record.id)
        if live is not None:
            self.registry._ensure_adapter(record, live)
        return self._credentials(record, credential)

    # ----------------------------------------------------------------- admin

    async def owned(self, node_id: str, org: str) -> NodeRecord:
        record = await self.store.get(node_id)
        if record is None:
            record = self.registry.by_name(node_id)  # a name works as well as an id
            record = await self.store.get(record.id) if record is not None else None
        if record is None or org not in ("*", record.org):
            raise NotFoundError(f"No such node: {node_id}.")
        return record

    async def set_state(self, record: NodeRecord, state: str) -> NodeRecord:
        record = record.with_(state=state)
        await self.store.update(record)
        self.registry.put(record)
        return record

    async def revoke(self, record: NodeRecord) -> NodeRecord:
        if record.revoked_at is None:
            record = record.with_(revoked_at=self.clock())
            await self.store.update(record)
        self.registry.put(record)
        await self.registry.forget(record.id)
        return record

    async def update(self, record: NodeRecord, changes: dict[str, Any]) -> NodeRecord:
        record = record.with_(**changes)
        await self.store.update(record)
        self.registry.put(record)
        return record


def _mode_url(body: dict[str, Any]) -> tuple[str, str | None]:
    mode = body.get("mode", "direct")
    if mode not in ("direct", "tunnel"):
        raise InvalidRequestError("'mode' must be 'direct' or 'tunnel'.", param="mode")
    url = body.get("url")
    if mode == "direct":
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2000:
            raise InvalidRequestError("Direct mode needs the agent's 'url' (http(s)://host:port/v1).", param="url")
        return mode, url.rstrip("/")
    return mode, None


def _models(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or len(raw) > 1000:
        raise InvalidRequestError("'models' must be a list of {id, ...} objects.", param="models")
    out = []
    for m in raw:
        if isinstance(m, str):
            m = {"id": m}
        if not isinstance(m, dict) or not isinstance(m.get("id"), str) or not m["id"]:
            raise InvalidRequestError("each of 'models' needs a string 'id'.", param="models")
        keep = {k: v for k, v in m.items() if k in ("id", "context_length", "tools", "embeddings", "owned_by")}
        out.append(keep)
    return out


def _labels(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise InvalidRequestError("'labels' must be an object of strings.", param="labels")
    return dict(raw)


def _price(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(k in ("input", "output") and isinstance(v, int | float | str) for k, v in raw.items()):
        raise InvalidRequestError("'price' must be {input, output} in USD per 1M tokens.", param="price")
    try:
        from decimal import Decimal

        values = {k: str(Decimal(str(v))) for k, v in raw.items()}
    except Exception:  # noqa: BLE001 - decimal.InvalidOperation
        raise InvalidRequestError("'price' values must be numbers.", param="price") from None
    if any(v.startswith("-") for v in values.values()):
        raise InvalidRequestError("'price' values must not be negative.", param="price")
    return {"input": values.get("input", "0"), "output": values.get("output", "0")}
