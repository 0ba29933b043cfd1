"""The gateway's own small endpoints, and the innermost path switch.

``GatewayEndpoints`` is the app at the centre of the pipeline: inference requests go
to the :class:`~asgi_llm.dispatch.DispatchApp` (through failover, when configured);
``GET /v1/models``, ``/healthz`` and ``/readyz`` are answered here; anything else is an
OpenAI-shaped 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_llm._asgi import send_json
from asgi_llm.context import gateway_headers
from asgi_llm.errors import ModelNotFoundError, NotFoundError
from asgi_llm.request import ensure_context
from asgi_llm.openapi import OPENAPI_PATH, send_openapi
from asgi_llm.routing.router import Router

__all__ = ["GatewayEndpoints", "ReadinessCheck", "mark_draining"]

ReadinessCheck = Callable[[], Awaitable[str | None]]
"""Returns ``None`` when ready, else a short reason (e.g. ``"ledger store unreachable"``).

The checks are of the *shared* stores (Redis, PostgreSQL). ``/readyz`` reports their
problems but still answers 200 (``"status": "degraded"``): every replica shares those
stores, so an outage fails the check on all of them at once, and a balancer acting on
it would empty its whole pool — clients would get the balancer's own error page instead
of the gateway's OpenAI-shaped answer (``stores.state_failure``: a 503 with
``Retry-After``, or serving on without limits), and the pool would come back only after
the balancer's rise interval. A replica that can answer requests stays in the pool; one
that cannot accept connections (stopping, crashed) fails the check by itself."""


class GatewayEndpoints:
    """Route a request that passed the middlewares to the right handler."""

    def __init__(
        self,
        *,
        inference: ASGIApp,
        router: Router,
        readiness: Sequence[ReadinessCheck] = (),
        admin: ASGIApp | None = None,
    ) -> None:
        self.inference = inference
        self.router = router
        self.readiness = list(readiness)
        self.admin = admin
        self.draining = False
        """Set once by :func:`mark_draining` (the process is stopping): ``/readyz`` answers 503."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx, receive = await ensure_context(scope, receive)
        if ctx.is_inference:
            await self.inference(scope, receive, send)
        elif ctx.endpoint == "models":
            await self._models(scope, send, ctx.path)
        elif ctx.endpoint == "health":
            await self._health(send, ctx.path, gateway_headers(ctx))
        elif ctx.endpoint in ("admin", "nodes") and self.admin is not None:
            await self.admin(scope, receive, send)
        elif ctx.path == OPENAPI_PATH and scope["method"] in ("GET", "HEAD"):
            await send_openapi(send, gateway_headers(ctx))
        else:
            raise NotFoundError(
                f"No such endpoint: {scope['method']} {ctx.path}. The gateway serves "
                "/v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models."
            )

    def visible_models(self, scope: Scope) -> list[str]:
        """The public model names this caller may use (all, until keys restrict them)."""
        principal = scope["asgi_llm"].principal
        names = self.router.model_names() + self.router.auto_model_names(principal.org)
        return [n for n in names if principal.allows_model(n)]

    async def _models(self, scope: Scope, send: Send, path: str) -> None:
        headers = gateway_headers(scope["asgi_llm"])
        names = self.visible_models(scope)
        prefix = "/v1/models/" if path.startswith("/v1/") else "/models/"
        if path.startswith(prefix):
            name = path[len(prefix):]
            if name not in names:
                raise ModelNotFoundError(f"The model '{name}' does not exist or you do not have access to it.", param="model")
            await send_json(send, 200, _model_obj(name), headers)
            return
        await send_json(send, 200, {"object": "list", "data": [_model_obj(n) for n in names]}, headers)

    async def _health(self, send: Send, path: str, headers: list[tuple[bytes, bytes]]) -> None:
        if path == "/healthz":
            await send_json(send, 200, {"status": "ok"}, headers)
            return
        if self.draining:
            await send_json(send, 503, {"status": "draining"}, headers)
            return
        problems = [p for p in [await check() for check in self.readiness] if p]
        if problems:  # shared stores: see ReadinessCheck for why this is not a 503
            await send_json(send, 200, {"status": "degraded", "problems": problems}, headers)
        else:
            await send_json(send, 200, {"status": "ready"}, headers)


def mark_draining(app: object) -> bool:
    """Make the gateway's ``/readyz`` answer 503 from now on (``asgi-llm serve`` on
    SIGTERM); requests are still served. Returns whether the endpoints were found."""
    for _ in range(64):
        if isinstance(app, GatewayEndpoints):
            app.draining = True
            return True
        app = getattr(app, "app", None)
        if app is None:
            break
    return False


def _model_obj(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "asgi-llm"}
