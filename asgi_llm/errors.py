"""The gateway's exceptions, and how each one looks on the wire.

Every error a client can see is a :class:`GatewayError`. Each subclass pins the
HTTP status, OpenAI's error ``type`` and a default ``code`` as class attributes;
context is passed keyword-only. On the wire an error is always OpenAI's shape::

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

and, once a stream has started, one terminal ``data: {"error": {...}}`` SSE event.

The tree::

    GatewayError                       500 server_error
    ├── InvalidRequestError            400 invalid_request_error
    │   ├── BodyTooLargeError          413
    │   ├── RequestTimeoutError        408 request_timeout (the client sent its body too slowly)
    │   ├── ModelNotFoundError         404 model_not_found
    │   ├── NotFoundError              404 not_found
    │   └── MethodNotAllowedError      405 method_not_allowed
    ├── AuthenticationError            401 authentication_error
    ├── PermissionDeniedError          403 permission_error
    ├── RateLimitError                 429 rate_limit_error
    ├── ServiceUnavailableError        503 service_unavailable
    └── UpstreamError                  502 upstream_error      (the upstream misbehaved)
        ├── UpstreamConnectionError    502 upstream_connection_error
        ├── UpstreamTimeoutError       504 upstream_timeout
        ├── UpstreamProtocolError      502 bad_upstream_response (garbage, malformed chunk, early end)
        └── UpstreamStatusError        the upstream answered with an error status
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "AuthenticationError",
    "BodyTooLargeError",
    "GatewayError",
    "InvalidRequestError",
    "MethodNotAllowedError",
    "ModelNotFoundError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "ServiceUnavailableError",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamTimeoutError",
    "error_body",
]


class GatewayError(Exception):
    """Root of every error the gateway reports to a client.

    Example:
        >>> raise ModelNotFoundError("The model 'gpt-5' does not exist", param="model")
    """

    status_code: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code  # type: ignore[misc]  # instance override of the class default
        if status_code is not None:
            self.status_code = status_code  # type: ignore[misc]
        self.headers: dict[str, str] = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI-shaped body: ``{"error": {message, type, param, code}}``."""
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """Build OpenAI's error object (shared by our errors and relayed upstream errors)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class InvalidRequestError(GatewayError):
    """The request is malformed: bad JSON, wrong types, missing fields."""

    status_code = 400
    type = "invalid_request_error"


class BodyTooLargeError(InvalidRequestError):
    """The request body is larger than the configured ``server.max_body_bytes``."""

    status_code = 413
    code = "request_too_large"


class RequestTimeoutError(InvalidRequestError):
    """The client did not finish sending its request body within ``server.body_read_timeout_s``."""

    status_code = 408
    code = "request_timeout"


class ModelNotFoundError(InvalidRequestError):
    """The public model name is not configured (or not visible to the caller)."""

    status_code = 404
    code = "model_not_found"


class NotFoundError(InvalidRequestError):
    """No such path."""

    status_code = 404
    code = "not_found"


class MethodNotAllowedError(InvalidRequestError):
    """The path exists but not with this HTTP method."""

    status_code = 405
    code = "method_not_allowed"


class AuthenticationError(GatewayError):
    """Missing, malformed, unknown, expired or revoked API key."""

    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    """The key is valid but may not do this."""

    status_code = 403
    type = "permission_error"
    code = "permission_denied"


class RateLimitError(GatewayError):
    """A limit or quota tripped; carries ``Retry-After``."""

    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailableError(GatewayError):
    """The gateway cannot serve right now (no healthy target, store down, draining)."""

    status_code = 503
    type = "service_unavailable"
    code = "service_unavailable"


class UpstreamError(GatewayError):
    """The upstream failed. ``retryable`` tells failover whether another attempt may help."""

    status_code = 502
    type = "upstream_error"
    code = "upstream_error"
    retryable: bool = True

    def __init__(self, message: str, *, target: str | None = None, retryable: bool | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.target = target
        if retryable is not None:
            self.retryable = retryable


class UpstreamConnectionError(UpstreamError):
    """Could not connect, or the connection was reset."""

    code = "upstream_connection_error"


class UpstreamTimeoutError(UpstreamError):
    """Connect, first-token, idle or per-attempt timeout."""

    status_code = 504
    type = "timeout_error"
    code = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    """The upstream answered something that is not the OpenAI wire format."""

    code = "bad_upstream_response"


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an error status.

    Client errors the upstream reports about the request itself (400, 404, 413, 422)
    are relayed with their status and message; the rest map to gateway statuses so
    that a client never mistakes, say, the gateway's upstream credential being
    rejected (upstream 401) for its own key being wrong.
    """

    def __init__(
        self,
        message: str,
        *,
        upstream_status: int,
        upstream_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.upstream_status = upstream_status
        status, etype, retryable = _map_upstream_status(upstream_status)
        kwargs.setdefault("status_code", status)
        kwargs.setdefault("retryable", retryable)
        super().__init__(message, **kwargs)
        self.type = upstream_type if status < 500 and status != 429 and upstream_type else etype  # type: ignore[misc]


def _map_upstream_status(status: int) -> tuple[int, str, bool]:
    """(status for our client, error type, retryable on another target)."""
    if status == 429:
        return 429, "rate_limit_error", True
    if status in (401, 403):
        # The gateway's credential for that provider was refused: our problem, not the caller's.
        return 502, "upstream_error", True
    if status == 408:
        return 504, "timeout_error", True
    if 400 <= status < 500:
        return status, "invalid_request_error", False
    return 502, "upstream_error", True
