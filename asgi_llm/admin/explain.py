"""``POST /admin/explain``: the plan a request would get, and why — without calling anyone.

Body: the request exactly as a client would send it to ``/v1/chat/completions`` (or
``{"endpoint": "embeddings", "request": {...}}``). Query ``org=`` / ``key=`` explain it
as that caller would see it (rules match on them). Answer: the strategy, the matching
rule, the ordered plan, every skipped target with its reason, and per target its
health, price, estimated cost, latency EWMA and in-flight count.

Scoped like every admin view: an org admin explains for its own org only (asking for
another is a 403 — plans show that org's private node routes, prices and load); an
admin of every org (``org: "*"``) may name any. The body is parsed with the same checks
as an inference body (depth, NaN, lone surrogates: a 400, never a 500).
"""

from __future__ import annotations

import json
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_llm.admin._params import org_scope
from asgi_llm.context import RequestContext, new_request_id
from asgi_llm.errors import GatewayError, InvalidRequestError
from asgi_llm.routing.router import Router
from asgi_llm.schemas import parse_json, validate_payload
from asgi_llm.usage.accounting import estimate_request

__all__ = ["explain_route"]


def explain_route(router: Router) -> Route:
    """The admin route, bound to the gateway's router."""

    async def explain(request: Request) -> JSONResponse:
        org = org_scope(request)  # before the body: a foreign org is refused without reading it
        raw = await request.body()
        if not raw.strip():
            raise InvalidRequestError("The body must be the JSON request to explain.", code="invalid_json")
        body = parse_json(raw)
        endpoint = "chat"
        if isinstance(body, dict) and "request" in body:
            endpoint = body.get("endpoint", "chat")
            if endpoint not in ("chat", "completions", "embeddings"):
                raise InvalidRequestError("'endpoint' must be chat, completions or embeddings.", param="endpoint")
            body = body["request"]
        validate_payload(endpoint, body)
        caller = request.scope["asgi_llm"].principal
        key = request.query_params.get("key")
        principal = replace(caller, org=org or caller.org, key_id=key or caller.key_id, models=None)
        ctx = RequestContext(request_id=new_request_id(), endpoint=endpoint, method="POST",
                             path="/v1/chat/completions", body=json.dumps(body).encode(), payload=body,
                             model=body["model"], stream=body.get("stream") is True, principal=principal)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        try:
            plan = router.make_plan(ctx, headers)
        except GatewayError as exc:
            return JSONResponse({"plan": [], "error": exc.to_dict()["error"]}, status_code=200)
        acct = router.accountant
        prompt, completion = estimate_request(ctx, acct.default_max_tokens)
        details = []
        for t in plan.targets:
            cost = acct.estimate_cost(t, prompt, completion)
            info = {"route": t.route, "provider": t.provider, "model": t.model,
                    "price_per_1m": {"input": str(unit[0]), "output": str(unit[1])} if (unit := acct.unit_price(t)) else None,
                    "estimated_cost_usd": str(cost) if cost is not None else None,
                    "context_window": t.context_window}
            if router.health is not None:
                keys = router.key_ids.get(t.provider, [])
                info |= {"health": router.health.route_state(t.route, keys),
                         "latency_ewma_s": router.health.latency(t.route),
                         "in_flight": router.health.in_flight(t.route)}
            details.append(info)
        return JSONResponse({**plan.to_dict(), "targets": details,
                             "estimate": {"prompt_tokens": prompt, "completion_tokens": completion}})

    return Route("/admin/explain", explain, methods=["POST"])
