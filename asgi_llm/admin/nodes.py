"""The node admin API.

* ``POST /admin/enrollment-tokens`` ``{"org"?, "ttl_s"?, "labels"?, "price"?, "shared_with"?,
  "availability"?}`` → ``201 {"token", "id", "org", "expires_at", …}`` — the token is shown
  once; the node that joins with it gets the defaults.
* ``GET /admin/enrollment-tokens`` — issued tokens (never the secret), used or not.
* ``GET /admin/nodes`` — nodes with live ``status`` (online / offline / cordoned /
  draining / paused / revoked) and ``load``.
* ``GET /admin/nodes/report?since=7d`` — contribution: requests and tokens served per
  node and per owner org (from the usage ledger).
* ``GET|PATCH /admin/nodes/{id}`` — read; owner-set ``price``, ``shared_with``, ``labels``,
  ``availability``.
* ``POST /admin/nodes/{id}/cordon|uncordon|drain|pause|resume|revoke``, ``DELETE /admin/nodes/{id}`` (revoke).
* ``GET /admin/node-acceptance[?org=]`` / ``PUT /admin/node-acceptance`` ``{"org"?, "accept":
  [{"owner": <org>|"*", "max_price": {"input", "output"}}]}`` — which owners' shared nodes
  the org accepts, up to which price (see :mod:`asgi_llm.nodes.consent`); the answer also
  lists the recipe's rules for the org (``nodes.accept_shared``), which the org cannot remove.

A recipe admin key (org ``*``) manages every org's nodes and names the org of a token;
an org admin key sees and manages only its own org's (another org's node is a 404).
Sharing a node with every org (``shared_with: ["*"]``) needs a recipe admin key: an org
admin gets a 403. Prices are finite decimals between 0 and 10,000 USD per 1M tokens; a
node's ``{id}`` is its id (or, for its org, its name).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from asgi_llm.admin._params import parse_time
from asgi_llm.context import Principal, gateway_headers
from asgi_llm.errors import InvalidRequestError, PermissionDeniedError
from asgi_llm.nodes.consent import parse_rules
from asgi_llm.nodes.inputs import parse_labels, parse_optional_price
from asgi_llm.nodes.records import valid_window
from asgi_llm.schemas import parse_json_object

if TYPE_CHECKING:
    from asgi_llm.nodes.service import NodeService

__all__ = ["node_admin_routes"]

SUPER_ORG = "*"


def _caller(request: Request) -> Principal:
    return request.scope["asgi_llm"].principal  # type: ignore[no-any-return]


def _respond(request: Request, body: Any, status: int = 200) -> JSONResponse:
    headers = {k.decode(): v.decode() for k, v in gateway_headers(request.scope["asgi_llm"])}
    return JSONResponse(body, status_code=status, headers=headers)


async def _json(request: Request) -> dict[str, Any]:
    return parse_json_object(await request.body())


_MAX_SHARED = 100


def _shared(raw: Any, caller: Principal) -> tuple[str, ...]:
    if (not isinstance(raw, list) or len(raw) > _MAX_SHARED
            or not all(isinstance(o, str) and o and len(o) <= 200 and o.isprintable() for o in raw)):
        raise InvalidRequestError(f"'shared_with' must be a list of at most {_MAX_SHARED} org names "
                                  "(\"*\" = every org).", param="shared_with")
    if "*" in raw and caller.org != SUPER_ORG:
        raise PermissionDeniedError("Sharing a node with every org (\"*\") needs a recipe admin key; "
                                    "an org admin can share with named orgs, which must accept it.")
    return tuple(dict.fromkeys(raw))


def _availability(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or raw.get("mode") not in ("always", "windows", "paused"):
        raise InvalidRequestError("'availability' must be {\"mode\": \"always\"|\"paused\"|\"windows\", \"windows\": [\"HH:MM-HH:MM\", …]} (UTC).",
                                  param="availability")
    if raw["mode"] == "windows":
        windows = raw.get("windows")
        if (not isinstance(windows, list) or not windows or len(windows) > 48
                or not all(isinstance(w, str) and len(w) <= 11 and valid_window(w) for w in windows)):
            raise InvalidRequestError("'availability.windows' must list \"HH:MM-HH:MM\" (UTC) ranges.", param="availability.windows")
        return {"mode": "windows", "windows": windows}
    return {"mode": raw["mode"]}


def _node_changes(body: dict[str, Any], caller: Principal) -> dict[str, Any]:
    allowed = {"price", "shared_with", "labels", "availability"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        shown = [u[:40] for u in unknown[:10]]
        raise InvalidRequestError(f"Unknown field(s) {shown}; a node's {', '.join(sorted(allowed))} can be changed.")
    out: dict[str, Any] = {}
    if "price" in body:
        out["price"] = parse_optional_price(body["price"])
    if "shared_with" in body:
        out["shared_with"] = _shared(body["shared_with"], caller)
    if "labels" in body:
        out["labels"] = parse_labels(body["labels"])
    if "availability" in body:
        out["availability"] = _availability(body["availability"])
    return out


def node_admin_routes(service: NodeService, *, ledger: Any = None) -> list[BaseRoute]:
    """The routes, bound to ``service`` (and the usage ledger store, for the report)."""
    registry = service.registry

    async def create_token(request: Request) -> JSONResponse:
        caller = _caller(request)
        body = await _json(request)
        org = body.pop("org", None)
        if caller.org == SUPER_ORG:
            if not isinstance(org, str) or not org or org == SUPER_ORG:
                raise InvalidRequestError("Say which org the node will belong to: \"org\" is required for a super admin.", param="org")
        elif org is None:
            org = caller.org
        elif org != caller.org:
            raise PermissionDeniedError("An org admin can only enroll nodes for its own org.")
        if not isinstance(org, str) or len(org) > 200 or not org.isprintable():
            raise InvalidRequestError("'org' must be an org name.", param="org")
        ttl = body.pop("ttl_s", None)
        if ttl is not None and (not isinstance(ttl, int | float) or isinstance(ttl, bool) or not math.isfinite(ttl) or ttl <= 0):
            raise InvalidRequestError("'ttl_s' must be a positive, finite number of seconds.", param="ttl_s")
        defaults = _node_changes(body, caller)
        if "shared_with" in defaults:
            defaults["shared_with"] = list(defaults["shared_with"])
        secret, token = await service.create_token(org=org, ttl_s=ttl, defaults=defaults, created_by=caller.key_id)
        return _respond(request, {**token.public(), "token": secret}, 201)

    async def list_tokens(request: Request) -> JSONResponse:
        caller = _caller(request)
        org = request.query_params.get("org") if caller.org == SUPER_ORG else caller.org
        data = [t.public() for t in await service.store.list_tokens(org=org)]
        return _respond(request, {"object": "list", "data": data})

    async def list_nodes(request: Request) -> JSONResponse:
        caller = _caller(request)
        org = request.query_params.get("org") if caller.org == SUPER_ORG else caller.org
        records = await service.store.list(org=org)
        for r in records:
            registry.put(r)
        return _respond(request, {"object": "list", "data": [registry.describe(r) for r in records]})

    async def get_node(request: Request) -> JSONResponse:
        record = await service.owned(request.path_params["node_id"], _caller(request).org)
        return _respond(request, registry.describe(record))

    async def patch_node(request: Request) -> JSONResponse:
        record = await service.owned(request.path_params["node_id"], _caller(request).org)
        record = await service.update(record, _node_changes(await _json(request), _caller(request)))
        return _respond(request, registry.describe(record))

    async def action(request: Request) -> JSONResponse:
        record = await service.owned(request.path_params["node_id"], _caller(request).org)
        verb = request.path_params.get("action", "revoke")
        if verb == "revoke" or request.method == "DELETE":
            record = await service.revoke(record)
        elif verb in ("cordon", "drain"):
            record = await service.set_state(record, "cordoned" if verb == "cordon" else "draining")
        elif verb == "uncordon":
            record = await service.set_state(record, "active")
        elif verb == "pause":
            record = await service.update(record, {"availability": {"mode": "paused"}})
        elif verb == "resume":
            record = await service.update(record, {"availability": {"mode": "always"}})
        else:
            raise InvalidRequestError(f"Unknown node action {verb!r}: cordon, uncordon, drain, pause, resume, revoke.")
        return _respond(request, registry.describe(record))

    def _consent_org(caller: Principal, org: Any) -> str:
        if caller.org == SUPER_ORG:
            if not isinstance(org, str) or not org or org == SUPER_ORG or len(org) > 200 or not org.isprintable():
                raise InvalidRequestError("Say whose acceptance this is: \"org\" is required for a recipe admin.", param="org")
            return org
        if org is not None and org != caller.org:
            raise PermissionDeniedError("An org admin can only set its own org's acceptance of shared nodes.")
        return caller.org

    def _acceptance(org: str) -> dict[str, Any]:
        return {"object": "node.acceptance", "org": org,
                "accept": [r.public() for r in registry.org_consents(org)],
                "recipe": [r.public() for r in registry.recipe_consents.get(org, ())]}

    async def get_acceptance(request: Request) -> JSONResponse:
        org = _consent_org(_caller(request), request.query_params.get("org"))
        return _respond(request, _acceptance(org))

    async def put_acceptance(request: Request) -> JSONResponse:
        caller = _caller(request)
        body = await _json(request)
        unknown = set(body) - {"org", "accept"}
        if unknown or "accept" not in body:
            raise InvalidRequestError("The body is {\"org\"?, \"accept\": [{\"owner\": <org>|\"*\", "
                                      "\"max_price\": {\"input\", \"output\"}}]} ([] withdraws every consent).")
        org = _consent_org(caller, body.get("org"))
        rules = parse_rules(body["accept"])
        await service.set_consents(org, rules, by=caller.key_id)
        ctx = request.scope["asgi_llm"]
        ctx.audit_target = org
        ctx.audit_detail = {"accept": [r.public() for r in rules][:20]}
        return _respond(request, _acceptance(org))

    async def report(request: Request) -> JSONResponse:
        caller = _caller(request)
        if ledger is None:
            raise InvalidRequestError("The usage ledger is off (usage.enabled: false): no contribution report.")
        since = parse_time(request.query_params.get("since"), "since")
        until = parse_time(request.query_params.get("until"), "until")
        listed = await service.store.list()
        by_id = {r.id: r for r in listed}
        by_legacy_name: dict[str, Any] = {}  # rows written before node ids: the name of the time
        for r in listed:
            by_legacy_name.setdefault(r.name.split("#", 1)[0] if r.revoked_at is not None else r.name, r)
        rows = await ledger.report(group_by=["node"], since=since, until=until)
        per_node, per_owner = [], {}
        for row in rows:
            key = row.get("node") or ""
            record = by_id.get(key) or by_legacy_name.get(key)
            if record is None or caller.org not in (SUPER_ORG, record.org):
                continue
            item = {"node": record.name, "node_id": record.id, "owner": record.org,
                    **{k: row[k] for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "errors") if k in row}}
            per_node.append(item)
            agg = per_owner.setdefault(record.org, {"owner": record.org, "nodes": 0, "requests": 0, "prompt_tokens": 0,
                                                     "completion_tokens": 0, "total_tokens": 0})
            agg["nodes"] += 1  # one per row: a node with legacy (by name) and new rows counts twice
            for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
                agg[k] += int(item.get(k) or 0)
        return _respond(request, {"object": "node.report", "data": per_node, "owners": list(per_owner.values())})

    return [
        Route("/admin/enrollment-tokens", create_token, methods=["POST"]),
        Route("/admin/enrollment-tokens", list_tokens, methods=["GET"]),
        Route("/admin/nodes", list_nodes, methods=["GET"]),
        Route("/admin/node-acceptance", get_acceptance, methods=["GET"]),
        Route("/admin/node-acceptance", put_acceptance, methods=["PUT"]),
        Route("/admin/nodes/report", report, methods=["GET"]),
        Route("/admin/nodes/{node_id}", get_node, methods=["GET"]),
        Route("/admin/nodes/{node_id}", patch_node, methods=["PATCH"]),
        Route("/admin/nodes/{node_id}", action, methods=["DELETE"]),
        Route("/admin/nodes/{node_id}/{action}", action, methods=["POST"]),
    ]
