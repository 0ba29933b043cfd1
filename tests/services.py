"""Real PostgreSQL and Redis for the tests.

Locally a missing service skips the tests that need it, with the reason; under
``CI=true`` it is a failure — CI must never count an untested backend as passing.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

PG_HOST = os.environ.get("ASGI_LLM_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("ASGI_LLM_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("ASGI_LLM_TEST_PG_USER", "postgres")
REDIS_HOST = os.environ.get("ASGI_LLM_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("ASGI_LLM_TEST_REDIS_PORT", "6379"))


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (CI=true) when a service is not listening."""
    if _reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; under CI=true an unreachable service is a failure, not a skip")
    pytest.skip(f"{message} (start it to run these tests; CI starts it)")


def postgres_database() -> Iterator[str]:
    """Create a fresh PostgreSQL database; yield its URL; drop it afterwards."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    import psycopg

    name = "asgi_llm_test_" + uuid.uuid4().hex[:12]
    admin = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redis_url(db: int = 15) -> str:
    """A Redis URL on a test database index, flushed first."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    try:
        client.flushdb()
    finally:
        client.close()
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
