"""Node operations shared by the node API, the admin API and the tunnel endpoint:
enrollment, credential checks, heartbeats, re-registration, rotation, cordon/drain/revoke,
consents.

A direct node's URL is set at enrollment and changed only by :meth:`NodeService.register`
(``POST /nodes/register``, audited); heartbeats carry liveness and load, and a URL or mode
in a heartbeat is ignored. Every URL is normalised and checked against the network policy
(:mod:`asgi_llm.nodes.netpolicy`) before it is stored.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from asgi_llm._redact import redact_url
from asgi_llm.errors import AuthenticationError, InvalidRequestError, NotFoundError
from asgi_llm.nodes.consent import AcceptRule
from asgi_llm.nodes.inputs import parse_labels, parse_load, parse_models, parse_optional_price
from asgi_llm.nodes.netpolicy import NodeURLError, normalize_node_url
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
    from asgi_llm.nodes.registry import NodeRegistry
    from asgi_llm.nodes.store import SQLNodeStore

__all__ = ["NAME_RE", "NodeConflictError", "NodeService"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_MAX_SECRET = 256


def _token_error(problem: str) -> AuthenticationError:
    message = {
        "used": "This enrollment token was already used; ask an admin for a new one.",
        "expired": "This enrollment token has expired; ask an admin for a new one.",
    }.get(problem, "Unknown enrollment token.")
    return AuthenticationError(message, code=f"enrollment_token_{problem}")


class NodeOptions(Protocol):
    """What the service reads of the recipe's ``nodes`` section."""

    token_ttl_s: float
    max_token_ttl_s: float
    heartbeat_interval_s: float
    heartbeat_window_s: float


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

    def __init__(self, store: SQLNodeStore, registry: NodeRegistry, config: NodeOptions, *,
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

    async def check_enrollment_token(self, token: str | None) -> None:
        """Refuse (401) a missing, unknown, used or expired enrollment token — without
        consuming it — so nothing else (body, name lookups) happens for a caller without one."""
        if not token or not token.startswith(TOKEN_PREFIX) or len(token) > _MAX_SECRET:
            raise AuthenticationError("Enrollment needs a valid enrollment token (ent-llm-…).", code="invalid_enrollment_token")
        problem = await self.store.token_problem(secret_hash(self.registry.pepper(), token), at=self.clock())
        if problem is not None:
            raise _token_error(problem)

    async def enroll(self, token: str | None, body: dict[str, Any]) -> dict[str, Any]:
        """Exchange an enrollment token for a node credential (201 body). The route calls
        :meth:`check_enrollment_token` before reading the body; it is checked again here."""
        await self.check_enrollment_token(token)
        assert token is not None
        name = body.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidRequestError("'name' must be 1-63 letters, digits, '.', '_' or '-'.", param="name")
        if name in self.reserved:
            raise NodeConflictError(f"The name {name!r} belongs to a provider of this gateway; choose another.", code="node_name_taken")
        mode, url = await self._mode_url(body)
        models = parse_models(body.get("models"))
        labels = parse_labels(body.get("labels"))
        price = parse_optional_price(body.get("price"))
        pepper = self.registry.pepper()
        token_hash = secret_hash(pepper, token)
        org = await self.store.token_org(token_hash)
        taken = self.registry.by_name(name, org) if org is not None else None
        if taken is not None and taken.revoked_at is None:
            # Checked before the token is spent, so a clash costs the operator nothing.
            raise NodeConflictError(f"A node named {name!r} is already enrolled in org {org!r}; pick another --name.")
        node_id = new_id("node_")
        now = self.clock()
        record_token, problem = await self.store.consume_token(token_hash, node_id=node_id, at=now)
        if record_token is None:
            raise _token_error(problem or "unknown")
        defaults = record_token.defaults
        credential = new_secret(CREDENTIAL_PREFIX)
        cred_hash = secret_hash(pepper, credential)
        labels = {**defaults.get("labels", {}), **labels}
        if len(labels) > 32:
            labels = dict(list(labels.items())[:32])
        record = NodeRecord(
            id=node_id, name=name, org=record_token.org, credential_hash=cred_hash, mode=mode, url=url,
            labels=labels, models=models, price=price or defaults.get("price"),
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
        """Note the node alive with its load (clamped); update the models it advertises.

        A ``url`` or ``mode`` differing from the registered one is ignored (the answer
        says ``"url_ignored": true``): only :meth:`register` changes where the gateway calls.
        """
        changes: dict[str, Any] = {}
        if "models" in body:
            models = parse_models(body["models"])
            if models != record.models:
                changes["models"] = models
        ignored = (("mode" in body and body.get("mode", "direct") != record.mode)
                   or ("url" in body and body.get("url") is not None and _same_url(body.get("url"), record.url) is False))
        now = self.clock()
        if changes or record.last_seen_at is None or now - record.last_seen_at > 60:
            record = record.with_(**changes, last_seen_at=now)
            await self.store.update(record)
        self.registry.put(record)
        agent_state = "draining" if body.get("status") == "draining" else "ready"
        self.registry.heartbeat(record, load=parse_load(body.get("load")), agent_state=agent_state)
        out = {"object": "node.heartbeat", "node_id": record.id, "state": record.state,
               "status": self.registry.status(record), "heartbeat_interval_s": self.config.heartbeat_interval_s,
               "heartbeat_window_s": self.config.heartbeat_window_s}
        if ignored:
            out["url_ignored"] = True
        return out

    async def register(self, record: NodeRecord, body: dict[str, Any], *, audit: dict[str, Any] | None = None) -> dict[str, Any]:
        """Explicit re-registration: change the node's mode/URL (checked like at
        enrollment) and models. ``audit`` (the request's audit detail) gets the old and
        new URL, redacted."""
        if audit is not None:
            audit["node_id"] = record.id
            if isinstance(body.get("url"), str):
                audit["requested_url"] = redact_url(body["url"][:300])
        mode, url = await self._mode_url(body)
        changes: dict[str, Any] = {"mode": mode, "url": url}
        if "models" in body:
            changes["models"] = parse_models(body["models"])
        if audit is not None:
            audit.update({"node_id": record.id, "mode": mode, "url": redact_url(url) if url else None,
                          "previous_url": redact_url(record.url) if record.url else None})
        if any(getattr(record, k) != v for k, v in changes.items()):
            record = record.with_(**changes, last_seen_at=self.clock())
            await self.store.update(record)
        self.registry.put(record)
        live = self.registry.live.get(record.id)
        if live is not None:
            self.registry._ensure_adapter(record, live)
        return {"object": "node.registration", "node": self.registry.describe(record)}

    async def _mode_url(self, body: dict[str, Any]) -> tuple[str, str | None]:
        """``mode`` and the normalised, policy-checked ``url`` (``None`` for tunnels)."""
        mode = body.get("mode", "direct")
        if mode not in ("direct", "tunnel"):
            raise InvalidRequestError("'mode' must be 'direct' or 'tunnel'.", param="mode")
        if mode == "tunnel":
            return mode, None
        try:
            url = normalize_node_url(body.get("url"))
        except NodeURLError as exc:
            raise InvalidRequestError(str(exc), param="url", code="invalid_node_url") from None
        why = await self.registry.policy.check(url)
        if why is not None:
            raise InvalidRequestError(f"The node URL {redact_url(url)} is not allowed: {why}.", param="url",
                                      code="node_url_not_allowed")
        return mode, url

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
        """The node ``node_id`` (an id, or a name of the caller's org) if ``org`` may manage it."""
        if len(node_id) > 300:
            raise NotFoundError("No such node.")
        record = await self.store.get(node_id)
        if record is None:
            if org == "*":  # a name works as well as an id, when it names one node
                named = [r for r in self.registry.records.values() if r.name == node_id and r.revoked_at is None]
                if len(named) > 1:
                    raise NotFoundError(f"Several orgs have a node named {node_id!r}: use its id (see /admin/nodes).")
                found = named[0] if named else None
            else:
                found = self.registry.by_name(node_id, org)
            record = await self.store.get(found.id) if found is not None else None
        if record is None or org not in ("*", record.org):
            raise NotFoundError(f"No such node: {node_id}.")
        return record

    async def set_consents(self, org: str, rules: tuple[AcceptRule, ...], *, by: str | None) -> None:
        """Replace ``org``'s own acceptance of shared nodes (see :mod:`asgi_llm.nodes.consent`)."""
        await self.store.set_consent(org, [r.public() for r in rules], at=self.clock(), by=by)
        self.registry.set_org_consents(org, rules)

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



def _same_url(raw: Any, stored: str | None) -> bool | None:
    """Whether a heartbeat's URL is the registered one (``None`` when it cannot be parsed)."""
    try:
        return normalize_node_url(raw) == stored
    except NodeURLError:
        return False
