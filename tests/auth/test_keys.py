"""API keys: format, hashing, the key store contract (memory, SQLite, PostgreSQL), the key ring."""

from __future__ import annotations

import gc
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from asgi_llm.auth import KEY_PREFIX, KeyRing, MemoryKeyStore, SQLKeyStore, generate_key, hash_key
from asgi_llm.auth.keys import KeyRecord
from asgi_llm.config import AuthConfig, KeyLimits, StaticKey
from asgi_llm.context import Principal
from asgi_llm.errors import AuthenticationError
from asgi_llm.stores.sql import SQLDatabase, normalize_sql_url

pytestmark = pytest.mark.anyio


class TestKeyFormat:
    def test_generated_keys_are_prefixed_random_and_long(self) -> None:
        """Keys are sk-llm- + 43 URL-safe characters (32 random bytes), never repeating."""
        keys = {generate_key() for _ in range(200)}
        assert len(keys) == 200
        for k in keys:
            assert re.fullmatch(r"sk-llm-[A-Za-z0-9_-]{43}", k)

    def test_hash_is_hmac_sha256_with_the_pepper(self) -> None:
        """The stored hash is 64 hex digits, stable for a pepper and different under another."""
        k = generate_key()
        h = hash_key(b"p" * 32, k)
        assert re.fullmatch(r"[0-9a-f]{64}", h)
        assert h == hash_key(b"p" * 32, k)
        assert h != hash_key(b"q" * 32, k)
        assert k not in h


def clean_sql_url(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> str:
    """A fresh SQLite file, or the session's PostgreSQL database with an empty schema."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    url: str = request.getfixturevalue("postgres_url")
    engine = sa.create_engine(normalize_sql_url(url))
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return url


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def key_store(request: pytest.FixtureRequest, anyio_backend: str, tmp_path: Path) -> AsyncIterator[object]:
    """A key store: memory, or SQL on SQLite and PostgreSQL."""
    if request.param == "memory":
        yield MemoryKeyStore()
        return
    db = SQLDatabase(clean_sql_url(request, request.param, tmp_path))
    await db.start()
    try:
        yield SQLKeyStore(db)
    finally:
        await db.aclose()


def _record(i: int, org: str = "team-a", **kw: object) -> KeyRecord:
    return KeyRecord(id=f"key_{i:04d}", org=org, hash=f"{i:064x}", prefix="sk-llm-abcd", created_at=float(i), **kw)  # type: ignore[arg-type]


class TestKeyStoreContract:
    async def test_create_then_find_by_hash_and_id(self, key_store) -> None:  # noqa: ANN001
        """A created key is found by its hash and its id, with every field intact."""
        rec = _record(1, name="ci", scopes=frozenset({"inference", "admin"}), models=("chat",),
                      limits=KeyLimits(rpm=5, spend_usd_per_day="1.5"), model_limits={"chat": KeyLimits(tpm=100)},
                      expires_at=1e10, created_by="admin:0")
        await key_store.create(rec)
        assert await key_store.get_by_hash(rec.hash) == rec
        assert await key_store.get(rec.id) == rec
        assert await key_store.get_by_hash("0" * 63 + "f") is None
        assert await key_store.get("key_nope") is None

    async def test_list_is_per_org(self, key_store) -> None:  # noqa: ANN001
        """Listing by org returns only that org's keys, oldest first."""
        for i, org in enumerate(["a", "b", "a"]):
            await key_store.create(_record(i, org=org))
        assert [r.id for r in await key_store.list(org="a")] == ["key_0000", "key_0002"]
        assert [r.id for r in await key_store.list(org="b")] == ["key_0001"]
        assert len(await key_store.list()) == 3

    async def test_revoke_is_idempotent(self, key_store) -> None:  # noqa: ANN001
        """Revoking stamps revoked_at once; revoking again keeps the first time; unknown ids give None."""
        await key_store.create(_record(1))
        first = await key_store.revoke("key_0001", at=100.0)
        again = await key_store.revoke("key_0001", at=200.0)
        assert first is not None and first.revoked_at == 100.0
        assert again is not None and again.revoked_at == 100.0
        assert await key_store.revoke("key_nope", at=1.0) is None

    async def test_pepper_is_persisted_and_checked(self, key_store) -> None:  # noqa: ANN001
        """The persisted pepper is 32 bytes and stable; a second fingerprint is refused."""
        p1 = await key_store.pepper()
        assert len(p1) == 32 and await key_store.pepper() == p1
        assert await key_store.pepper_check("fp-1") is True
        assert await key_store.pepper_check("fp-1") is True
        assert await key_store.pepper_check("fp-2") is False


class TestSharedPepper:
    async def test_two_replicas_agree_on_the_persisted_pepper(self, anyio_backend: str, sql_url: str) -> None:
        """Two gateways on one database, neither configured with a pepper, accept each other's keys."""
        dbs = [SQLDatabase(sql_url), SQLDatabase(sql_url)]
        for db in dbs:
            await db.start()
        try:
            ring1, ring2 = (KeyRing(store=SQLKeyStore(db)) for db in dbs)
            await ring1.start()
            await ring2.start()
            key, rec = await ring1.create_key(org="team-a", name="k")
            assert (await ring2.authenticate(key)).key_id == rec.id
        finally:
            for db in dbs:
                await db.aclose()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class TestKeyRing:
    async def test_static_keys_resolve_and_are_not_kept_in_plain_text(self, anyio_backend: str) -> None:
        """Recipe keys map to principals with stable ids; the ring holds only their hashes."""
        secret = "sk-team-a-" + "x" * 20
        cfg = AuthConfig(admin_keys=["adm-" + "y" * 20],
                         keys=[StaticKey(key=secret, org="team-a", name="team-a-key", models=["chat"], limits=KeyLimits(rpm=3))])
        ring = KeyRing.from_config(cfg, store=None, environ={})
        p = await ring.authenticate(secret)
        assert (p.key_id, p.org, p.models, p.scopes) == ("static:team-a-key", "team-a", frozenset({"chat"}), frozenset({"inference"}))
        admin = await ring.authenticate("adm-" + "y" * 20)
        assert admin.org == "*" and admin.scopes == frozenset({"admin"})
        del cfg
        gc.collect()
        assert secret not in repr(vars(ring)) and secret not in repr(ring._static)

    @pytest.mark.parametrize("bad", ["", "a b", "x" * 600, "sk-llm-\x00zz", "clé-ünïcode"])
    async def test_malformed_keys_are_401(self, anyio_backend: str, bad: str) -> None:
        """Empty, spaced, huge, control-character and non-ASCII keys are refused as malformed."""
        ring = KeyRing(store=MemoryKeyStore())
        await ring.start()
        with pytest.raises(AuthenticationError, match="Malformed"):
            await ring.authenticate(bad)

    async def test_unknown_expired_revoked(self, anyio_backend: str) -> None:
        """Unknown, expired and revoked keys are 401s with distinct codes and no echo of the key."""
        clock = FakeClock()
        ring = KeyRing(store=MemoryKeyStore(), clock=clock)
        await ring.start()
        key, rec = await ring.create_key(org="o", expires_at=clock.now + 60)
        assert (await ring.authenticate(key)).org == "o"
        for probe in (generate_key(), "not-our-format-123"):
            with pytest.raises(AuthenticationError) as exc:
                await ring.authenticate(probe)
            assert exc.value.code == "invalid_api_key" and probe not in exc.value.message
        clock.now += 61
        with pytest.raises(AuthenticationError) as exc:
            await ring.authenticate(key)
        assert exc.value.code == "api_key_expired" and key not in exc.value.message
        key2, rec2 = await ring.create_key(org="o")
        await ring.revoke_key(rec2.id)
        with pytest.raises(AuthenticationError) as exc:
            await ring.authenticate(key2)
        assert exc.value.code == "api_key_revoked"

    async def test_revocation_reaches_other_replicas_within_the_cache_ttl(self, anyio_backend: str) -> None:
        """Another replica's cached lookup keeps a revoked key valid for at most cache_ttl_s."""
        clock, store = FakeClock(), MemoryKeyStore()
        here = KeyRing(store=store, clock=clock, cache_ttl_s=10)
        there = KeyRing(store=store, clock=clock, cache_ttl_s=10)
        await here.start()
        await there.start()
        key, rec = await here.create_key(org="o")
        assert (await there.authenticate(key)).key_id == rec.id  # cached on "there"
        await here.revoke_key(rec.id)
        with pytest.raises(AuthenticationError):
            await here.authenticate(key)  # immediate where revoked
        assert (await there.authenticate(key)).key_id == rec.id  # still cached
        clock.now += 10.5
        with pytest.raises(AuthenticationError):
            await there.authenticate(key)

    async def test_stored_lookups_are_cached(self, anyio_backend: str) -> None:
        """Within the TTL a valid key is checked without asking the store again."""
        calls = 0
        store = MemoryKeyStore()
        original = store.get_by_hash

        async def counting(h: str) -> object:
            nonlocal calls
            calls += 1
            return await original(h)

        store.get_by_hash = counting  # type: ignore[method-assign]
        ring = KeyRing(store=store, cache_ttl_s=30)
        await ring.start()
        key, _ = await ring.create_key(org="o")
        for _ in range(5):
            await ring.authenticate(key)
        assert calls == 1

    async def test_short_pepper_is_refused(self) -> None:
        """A configured pepper under 16 characters is a configuration error."""
        with pytest.raises(ValueError, match="16 characters"):
            KeyRing.from_config(AuthConfig(pepper="short"), store=None, environ={})
        with pytest.raises(ValueError, match="16 characters"):
            KeyRing.from_config(AuthConfig(), store=None, environ={"ASGI_LLM_PEPPER": "short"})

    async def test_changed_pepper_fails_at_start(self, anyio_backend: str) -> None:
        """Starting with a different pepper than the stored keys were hashed with fails loudly."""
        store = MemoryKeyStore()
        await KeyRing(store=store, pepper=b"a" * 32).start()
        with pytest.raises(RuntimeError, match="pepper"):
            await KeyRing(store=store, pepper=b"b" * 32).start()

    async def test_principal_of_a_stored_key(self, anyio_backend: str) -> None:
        """A stored key's principal carries its org, scopes, allow-list and limits."""
        ring = KeyRing(store=MemoryKeyStore())
        await ring.start()
        key, rec = await ring.create_key(org="o", name="n", scopes=["inference", "node"], models=["chat"],
                                         limits=KeyLimits(rpm=2), model_limits={"chat": KeyLimits(tpm=9)})
        p = await ring.authenticate(key)
        assert isinstance(p, Principal) and key.startswith(KEY_PREFIX)
        assert (p.org, p.name, p.scopes, p.models) == ("o", "n", frozenset({"inference", "node"}), frozenset({"chat"}))
        assert p.limits.key.rpm == 2 and p.limits.models["chat"].tpm == 9
