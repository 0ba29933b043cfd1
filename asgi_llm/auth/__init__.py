"""Tenancy and API keys: organisations, keys, scopes, allow-lists, expiry, revocation.

* :mod:`asgi_llm.auth.keys` — key format, HMAC-SHA256 hashing, :class:`KeyRecord`;
* :mod:`asgi_llm.auth.store` — the :class:`KeyStore` seam (memory, SQL);
* :mod:`asgi_llm.auth.keyring` — :class:`KeyRing`: recipe keys + stored keys + the
  pepper + a short lookup cache → :class:`~asgi_llm.context.Principal`.

The middleware is :class:`asgi_llm.middleware.auth.AuthMiddleware`; the admin API is
:mod:`asgi_llm.admin.keys`. Nothing here imports a database driver at import time.
"""

from __future__ import annotations

from asgi_llm.auth.keyring import PEPPER_ENV, SUPER_ORG, KeyRing
from asgi_llm.auth.keys import KEY_PREFIX, KeyRecord, PrincipalLimits, generate_key, hash_key
from asgi_llm.auth.store import KeyStore, MemoryKeyStore, SQLKeyStore

__all__ = [
    "KEY_PREFIX",
    "PEPPER_ENV",
    "SUPER_ORG",
    "KeyRecord",
    "KeyRing",
    "KeyStore",
    "MemoryKeyStore",
    "PrincipalLimits",
    "SQLKeyStore",
    "generate_key",
    "hash_key",
]
