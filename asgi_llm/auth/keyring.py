"""KeyRing: turn a presented API key into a :class:`~asgi_llm.context.Principal`.

Where keys come from
--------------------
* **Recipe keys** (``auth.admin_keys``, ``auth.keys``) are hashed when the gateway is
  built, with a random per-process salt (they are never persisted, so nothing else has
  to agree on it), and the plain values are not kept. Their ids are stable across
  replicas and restarts — ``static:<name>`` (or ``static:<org>:<index>``) and
  ``admin:<index>`` — because rate-limit counters are keyed by them. Recipe admin keys
  are *super admins*: org ``"*"``, scope ``admin``.
* **Stored keys** (created through ``POST /admin/keys``) live in a :class:`KeyStore`,
  hashed with the **pepper**.

The pepper
----------
``auth.pepper`` in the recipe, else ``$ASGI_LLM_PEPPER``, else a pepper generated once
and persisted in the SQL store (``auth_settings``) so that every replica and every
restart agrees — a random per-process pepper would make stored keys unusable on the
next start and on other replicas. A persisted pepper sits next to the hashes it
protects, so set ``ASGI_LLM_PEPPER`` (≥ 16 characters) in production; a warning says
so. A fingerprint of the pepper in use is recorded in the store: starting with a
different pepper than the one the stored keys were hashed with fails at startup
instead of silently rejecting every key.

Caching and revocation latency
------------------------------
Lookups of stored keys (hits and misses) are cached in-process for ``cache_ttl_s``
(10 s by default, bounded LRU), so authentication is not a database round trip per
request. Revoking a key takes effect at once on the replica that revoked it and within
``cache_ttl_s`` on the others. Expiry is checked on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from asgi_llm.auth.keys import (
    KEY_PREFIX,
    SCOPES,
    KeyRecord,
    PrincipalLimits,
    display_prefix,
    generate_key,
    hash_key,
    new_key_id,
)
from asgi_llm.auth.limits import KeyLimits
from asgi_llm.context import Principal
from asgi_llm.errors import AuthenticationError

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from asgi_llm.auth.store import KeyStore

__all__ = ["PEPPER_ENV", "SUPER_ORG", "KeyRing", "StaticEntry"]

logger = logging.getLogger("asgi_llm.auth")


class AuthOptions(Protocol):
    """What :meth:`KeyRing.from_config` reads of the recipe's ``auth`` section."""

    @property
    def pepper(self) -> str | None: ...
    @property
    def admin_keys(self) -> Sequence[str]: ...
    @property
    def keys(self) -> Sequence[Any]: ...
    @property
    def cache_ttl_s(self) -> float: ...

PEPPER_ENV = "ASGI_LLM_PEPPER"
SUPER_ORG = "*"
"""The org of recipe admin keys: they administer every org."""
MIN_PEPPER_CHARS = 16
_MAX_KEY_CHARS = 512


@dataclass(frozen=True, slots=True)
class StaticEntry:
    """A recipe key: its principal, and (for listings) where it came from."""

    principal: Principal
    source: str


def _unknown() -> AuthenticationError:
    return AuthenticationError(
        "Incorrect API key provided. Check the key you are sending, or ask your gateway administrator for one."
    )


class KeyRing:
    """Resolve API keys (recipe keys first, then the key store) to principals.

    Args:
        static: ``(plain key, principal)`` pairs from the recipe; hashed here, not kept.
        store: stored keys (``None``: recipe keys only).
        pepper: the pepper for stored keys; ``None`` = ask the store at :meth:`start`.
        cache_ttl_s: how long a stored key's lookup is trusted (revocation latency on
            other replicas). ``0`` disables the cache.
        clock: seconds since the epoch.
    """

    def __init__(
        self,
        *,
        static: Iterable[tuple[str, Principal]] = (),
        store: KeyStore | None = None,
        pepper: bytes | None = None,
        cache_ttl_s: float = 10.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # HMAC with a random salt; its key schedule is done once here and copied per
        # request (``_static_hash``), which halves the cost of hashing a presented key.
        self._salted = hmac.new(secrets.token_bytes(32), digestmod=hashlib.sha256)
        self._static: dict[str, Principal] = {}
        self._static_ids: dict[str, str] = {}  # key id → a stable digest of the key (see static_fingerprint)
        for key, principal in static:
            self._static[self._static_hash(key)] = principal
            self._static_ids[principal.key_id] = hashlib.sha256(b"asgi-llm recipe key\0" + key.encode()).hexdigest()
        self.store = store
        self._pepper = pepper
        self.cache_ttl_s = cache_ttl_s
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        self._clock = clock

    @classmethod
    def from_config(cls, auth: AuthOptions, *, store: KeyStore | None, environ: Mapping[str, str] | None = None) -> KeyRing:
        """Build from the recipe's ``auth`` section (raises ``ValueError`` for a bad pepper)."""
        env = os.environ if environ is None else environ
        pepper_text = auth.pepper or env.get(PEPPER_ENV) or None
        if pepper_text is not None and len(pepper_text) < MIN_PEPPER_CHARS:
            raise ValueError(f"the pepper must be at least {MIN_PEPPER_CHARS} characters")
        static: list[tuple[str, Principal]] = []
        for i, admin_key in enumerate(auth.admin_keys):
            static.append((admin_key, Principal(key_id=f"admin:{i}", org=SUPER_ORG, scopes=frozenset({"admin"}),
                                                name=f"recipe admin key {i}")))
        for i, k in enumerate(auth.keys):
            models = None if "*" in k.models else frozenset(k.models)
            limits = PrincipalLimits(k.limits, dict(k.model_limits))
            key_id = f"static:{k.name}" if k.name else f"static:{k.org}:{i}"
            static.append((k.key, Principal(key_id=key_id, org=k.org, scopes=frozenset(k.scopes), models=models,
                                            name=k.name or key_id, limits=limits)))
        pepper = hashlib.sha256(pepper_text.encode()).digest() if pepper_text else None
        return cls(static=static, store=store, pepper=pepper, cache_ttl_s=auth.cache_ttl_s)

    def _static_hash(self, key: str) -> str:
        mac = self._salted.copy()
        mac.update(key.encode())
        return mac.hexdigest()

    @property
    def static_principals(self) -> list[Principal]:
        """The recipe keys' principals (no secrets)."""
        return list(self._static.values())

    def static_fingerprint(self, key_id: str) -> str | None:
        """A digest of the recipe key now behind ``key_id``, stable across processes
        (``None``: no such recipe key). Recipe key ids are positional (``admin:0``): a
        console session remembers this — MACed with its own secret, never in clear — and
        notices when the recipe puts another key at that position."""
        return self._static_ids.get(key_id)

    # ------------------------------------------------------------------ lifecycle

    @property
    def pepper(self) -> str | None:
        """The server pepper (after :meth:`start`); other capabilities (node credentials)
        hash their secrets with it. Never log it."""
        return self._pepper

    async def start(self, task_group: TaskGroup | None = None) -> None:
        """Resolve the pepper (persisted one if none is configured) and check it matches."""
        if self.store is None:
            return
        if self._pepper is None:
            self._pepper = await self.store.pepper()
            logger.warning(
                "auth: no pepper configured (auth.pepper or $%s); using the one persisted in the key store. "
                "Set %s in production so a copy of the database alone cannot be used to test keys.",
                PEPPER_ENV, PEPPER_ENV,
            )
        fingerprint = hash_key(self._pepper, "asgi-llm pepper fingerprint v1")
        if not await self.store.pepper_check(fingerprint):
            raise RuntimeError(
                "auth: the configured pepper is not the one the stored API keys were hashed with; "
                f"restore the previous auth.pepper / ${PEPPER_ENV} (every stored key would be rejected otherwise)"
            )

    async def aclose(self) -> None:
        self._cache.clear()

    # ------------------------------------------------------------------ authentication

    async def authenticate(self, key: str) -> Principal:
        """The principal for ``key``; :class:`AuthenticationError` when it is unknown,
        expired or revoked. Raises :class:`~asgi_llm.stores.StoreError` when the key
        store is down (recipe keys keep working)."""
        if not key or len(key) > _MAX_KEY_CHARS or not key.isascii() or not key.isprintable() or " " in key:
            raise AuthenticationError("Malformed API key: expected a single token such as 'sk-llm-…'.")
        digest = self._static_hash(key)
        principal = self._static.get(digest)
        if principal is not None:
            return principal
        if self.store is None or self._pepper is None or not key.startswith(KEY_PREFIX):
            raise _unknown()
        record = await self._lookup(hash_key(self._pepper, key))
        if record is None:
            raise _unknown()
        now = self._clock()
        if record.revoked_at is not None:
            raise AuthenticationError("This API key has been revoked.", code="api_key_revoked")
        if record.expires_at is not None and record.expires_at <= now:
            raise AuthenticationError("This API key has expired.", code="api_key_expired")
        return record.principal()

    async def _lookup(self, key_hash: str) -> KeyRecord | None:
        assert self.store is not None
        now = self._clock()
        hit = self._cache.get(key_hash)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(key_hash)
            return hit[1]
        record = await self.store.get_by_hash(key_hash)
        if record is not None and not hmac.compare_digest(record.hash, key_hash):
            record = None
        if self.cache_ttl_s > 0:
            self._cache[key_hash] = (now + self.cache_ttl_s, record)
            self._cache.move_to_end(key_hash)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return record

    # ------------------------------------------------------------------ management

    def _require_store(self) -> KeyStore:
        if self.store is None or self._pepper is None:
            from asgi_llm.errors import ServiceUnavailableError

            raise ServiceUnavailableError(
                "Stored API keys are disabled on this gateway (auth.keys_from_db: false); declare keys in the recipe."
            )
        return self.store

    async def create_key(
        self,
        *,
        org: str,
        name: str | None = None,
        scopes: Iterable[str] = ("inference",),
        models: Iterable[str] = ("*",),
        limits: KeyLimits | None = None,
        model_limits: Mapping[str, KeyLimits] | None = None,
        expires_at: float | None = None,
        created_by: str | None = None,
    ) -> tuple[str, KeyRecord]:
        """Create and store a key; return ``(the key — shown once, its record)``."""
        store = self._require_store()
        assert self._pepper is not None
        scopes = frozenset(scopes)
        if not scopes or not scopes <= SCOPES:
            raise ValueError(f"scopes must be a non-empty subset of {sorted(SCOPES)}")
        key = generate_key()
        record = KeyRecord(
            id=new_key_id(), org=org, hash=hash_key(self._pepper, key), prefix=display_prefix(key), name=name,
            scopes=scopes, models=tuple(models) or ("*",), limits=limits or KeyLimits(),
            model_limits=dict(model_limits or {}), created_at=self._clock(), expires_at=expires_at,
            created_by=created_by,
        )
        await store.create(record)
        return key, record

    async def list_keys(self, *, org: str | None = None) -> list[KeyRecord]:
        """Stored keys (all orgs when ``org`` is ``None``)."""
        return await self._require_store().list(org=org)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self._require_store().get(key_id)

    async def revoke_key(self, key_id: str) -> KeyRecord | None:
        """Revoke a stored key; effective at once here, within ``cache_ttl_s`` elsewhere."""
        record = await self._require_store().revoke(key_id, at=self._clock())
        if record is not None:
            self._cache.pop(record.hash, None)
        return record
