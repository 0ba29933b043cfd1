"""The node API, for agents (node credentials, not API keys):

* ``POST /nodes/enroll`` — ``Authorization: Bearer ent-llm-…`` (one-time enrollment token);
  body ``{"name", "mode": "direct"|"tunnel", "url" (direct), "models": [{"id", "context_length"?, …}],
  "labels"?, "price"?}`` → ``201 {"node_id", "name", "org", "credential", "call_secret",
  "heartbeat_interval_s", "heartbeat_window_s", "node"}``.
* ``POST /nodes/heartbeat`` — ``Bearer nc-llm-…``; body ``{"status": "ready"|"draining",
  "load": {"in_flight", "queue_depth", "running", "kv_cache_usage"}, "models"?}`` → ``{"state",
  "status", …}``. Load figures are clamped to their range; a ``url``/``mode`` that differs
  from the registered one is ignored (``"url_ignored": true``).
* ``POST /nodes/register`` — ``Bearer nc-llm-…``; body ``{"mode", "url" (direct), "models"?}``:
  the only way to change where the gateway calls the node. Checked like enrollment (URL
  shape, ``nodes.allowed_networks``) and recorded in the audit log (old and new URL, redacted).
* ``POST /nodes/rotate`` — a new credential (and call secret); the old one dies at once.
* ``GET /nodes/me`` — the node's own record.
* ``/nodes/tunnel`` (WebSocket) — see :mod:`asgi_llm.nodes.tunnel`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from asgi_llm.context import gateway_headers
from asgi_llm.schemas import parse_json_object
from asgi_llm.auth.presented import presented_key

if TYPE_CHECKING:
    from asgi_llm.nodes.service import NodeService

__all__ = ["node_routes"]


def _respond(request: Request, body: Any, status: int = 200) -> JSONResponse:
    headers = {k.decode(): v.decode() for k, v in gateway_headers(request.scope["asgi_llm"])}
    return JSONResponse(body, status_code=status, headers=headers)


async def _json(request: Request, *, non_finite: bool = False) -> dict[str, Any]:
    return parse_json_object(await request.body(), non_finite=non_finite)


def node_routes(service: NodeService) -> list[BaseRoute]:
    """The ``/nodes/...`` HTTP routes, bound to ``service``."""

    async def enroll(request: Request) -> JSONResponse:
        service.registry.policy.learn_self(request.scope.get("server"))
        token = presented_key(request.scope)
        await service.check_enrollment_token(token)  # before the body is read or any name resolved
        return _respond(request, await service.enroll(token, await _json(request)), 201)

    async def heartbeat(request: Request) -> JSONResponse:
        record = await service.authenticate(presented_key(request.scope))
        return _respond(request, await service.heartbeat(record, await _json(request, non_finite=True)))  # load is clamped

    async def register(request: Request) -> JSONResponse:
        service.registry.policy.learn_self(request.scope.get("server"))
        record = await service.authenticate(presented_key(request.scope))
        ctx = request.scope["asgi_llm"]
        ctx.audit_target = record.id
        detail: dict[str, Any] = {}
        ctx.audit_detail = detail
        return _respond(request, await service.register(record, await _json(request), audit=detail))

    async def rotate(request: Request) -> JSONResponse:
        record = await service.authenticate(presented_key(request.scope))
        return _respond(request, await service.rotate(record))

    async def me(request: Request) -> JSONResponse:
        record = await service.authenticate(presented_key(request.scope))
        return _respond(request, service.registry.describe(record))

    return [
        Route("/nodes/enroll", enroll, methods=["POST"]),
        Route("/nodes/heartbeat", heartbeat, methods=["POST"]),
        Route("/nodes/register", register, methods=["POST"]),
        Route("/nodes/rotate", rotate, methods=["POST"]),
        Route("/nodes/me", me, methods=["GET"]),
    ]
