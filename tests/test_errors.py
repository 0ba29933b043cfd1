"""The error tree and its wire shape."""

from __future__ import annotations

import json

import pytest

from asgi_llm.errors import (
    BodyTooLargeError,
    GatewayError,
    ModelNotFoundError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)


class TestShape:
    def test_openai_shape(self) -> None:
        """Every error serialises to OpenAI's {"error": {message, type, param, code}}."""
        body = json.loads(ModelNotFoundError("no such model", param="model").to_json())
        assert body == {"error": {"message": "no such model", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}

    def test_class_attributes_pin_status(self) -> None:
        """Subclasses pin status and type; instances may override the code."""
        assert BodyTooLargeError("x").status_code == 413
        assert UpstreamTimeoutError("x").status_code == 504
        assert GatewayError("x", code="custom").code == "custom"
        assert GatewayError.code is None


class TestUpstreamStatusMapping:
    @pytest.mark.parametrize(
        ("upstream", "status", "retryable"),
        [(400, 400, False), (404, 404, False), (422, 422, False), (401, 502, True), (403, 502, True),
         (408, 504, True), (429, 429, True), (500, 502, True), (503, 502, True)],
    )
    def test_status_mapping(self, upstream: int, status: int, retryable: bool) -> None:
        """Upstream statuses map to what the client should see, and whether another target may help."""
        err = UpstreamStatusError("x", upstream_status=upstream)
        assert err.status_code == status
        assert err.retryable is retryable

    def test_client_errors_keep_upstream_type(self) -> None:
        """A relayed 400 keeps the upstream's error type; a 5xx becomes upstream_error."""
        assert UpstreamStatusError("x", upstream_status=400, upstream_type="invalid_request_error").type == "invalid_request_error"
        assert UpstreamStatusError("x", upstream_status=500, upstream_type="server_error").type == "upstream_error"
