"""The key a request presents: ``Authorization: Bearer <key>`` or ``x-api-key``.

Shared by the auth layer (client and admin keys) and the node API (node credentials).
"""

from __future__ import annotations

from starlette.types import Scope

from asgi_llm._asgi import get_header
from asgi_llm.errors import AuthenticationError

__all__ = ["presented_key"]


def presented_key(scope: Scope) -> str | None:
    """The key a request presents (``None`` if none); raises for a malformed header."""
    auth = get_header(scope, b"authorization")
    if auth is not None:
        try:
            text = auth.decode("ascii").strip()
        except UnicodeDecodeError:
            raise AuthenticationError("Malformed Authorization header: expected 'Bearer <key>'.") from None
        scheme, _, token = text.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("Malformed Authorization header: expected 'Bearer <key>'.")
        return token
    api_key = get_header(scope, b"x-api-key")
    if api_key is not None:
        try:
            return api_key.decode("ascii").strip() or None
        except UnicodeDecodeError:
            raise AuthenticationError("Malformed x-api-key header.") from None
    return None
