"""The key admin API: ``POST/GET /admin/keys``, ``GET/DELETE /admin/keys/{id}``.

Who sees what: a recipe admin key (``auth.admin_keys``) is a *super admin* (org ``"*"``):
it manages every org's keys and must name the org when creating one. A stored key with
the ``admin`` scope is an *org admin*: it sees, creates and revokes only its own org's
keys; another org's key is a 404, exactly like a key that does not exist.

``POST /admin/keys`` body (JSON)::

    {"org": "team-a", "name": "ci", "scopes": ["inference"], "models": ["chat"],
     "limits": {"rpm": 60, "tpm": 100000, "spend_usd_per_day": 5},
     "model_limits": {"chat": {"rpm": 10}}, "expires_in_s": 86400}   # or "expires_at": <epoch s>

answers ``201`` with the key's record and ``"key"`` — the secret, shown this once.
Listings show a key's ``prefix`` (``sk-llm-AbCd``), never the key or its hash. Recipe
keys appear in listings (``"source": "recipe"``) but are changed in the recipe only.
"""

from __future__ import annotations

import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from asgi_llm.auth.keyring import SUPER_ORG
from asgi_llm.auth.limits import KeyLimits
from asgi_llm.context import Principal, gateway_headers
from asgi_llm.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from asgi_llm.schemas import parse_json_object

if TYPE_CHECKING:
    from asgi_llm.auth.keyring import KeyRing

__all__ = ["CreateKey", "key_routes"]


MAX_LIMIT = 2**53
"""Largest rpm / tpm / concurrency a key may carry (exact in every store and in JSON)."""
MAX_SPEND_USD = Decimal(10**9)
"""Largest spend quota (USD per day or month) a key may carry."""
MAX_EXPIRES_S = 100 * 365 * 86400.0


class CreateKey(BaseModel):
    """The body of ``POST /admin/keys``. Names and orgs are printable text (no NUL or other
    control characters, which no store accepts), limits bounded — so a bad body is a 400,
    never a store error."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    org: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[^*\s]+$")
    name: str | None = Field(None, max_length=200)
    scopes: list[str] = Field(default_factory=lambda: ["inference"], min_length=1, max_length=3)
    models: list[str] = Field(default_factory=lambda: ["*"], min_length=1, max_length=1000)
    limits: KeyLimits = Field(default_factory=KeyLimits)
    model_limits: dict[str, KeyLimits] = Field(default_factory=dict, max_length=1000)
    expires_at: float | None = Field(None, gt=0, allow_inf_nan=False)
    expires_in_s: float | None = Field(None, gt=0, le=MAX_EXPIRES_S, allow_inf_nan=False)

    @field_validator("org", "name")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and not value.isprintable():
            raise ValueError("must be printable text (no control characters such as NUL)")
        return value

    @field_validator("scopes", "models")
    @classmethod
    def _short_names(cls, value: list[str]) -> list[str]:
        if any(len(v) > 200 or not v.isprintable() for v in value):
            raise ValueError("names must be at most 200 printable characters")
        return value

    @field_validator("limits")
    @classmethod
    def _limits(cls, value: KeyLimits) -> KeyLimits:
        return _bounded_limits(value)

    @field_validator("model_limits")
    @classmethod
    def _model_limits(cls, value: dict[str, KeyLimits]) -> dict[str, KeyLimits]:
        for limits in value.values():
            _bounded_limits(limits)
        return value


def _bounded_limits(limits: KeyLimits) -> KeyLimits:
    for name in ("rpm", "tpm", "concurrency"):
        number = getattr(limits, name)
        if number is not None and number > MAX_LIMIT:
            raise ValueError(f"{name} may be at most 2**53 ({MAX_LIMIT})")
    for name in ("spend_usd_per_day", "spend_usd_per_month"):
        spend = getattr(limits, name)
        if spend is not None and (not spend.is_finite() or spend > MAX_SPEND_USD):
            raise ValueError(f"{name} must be a finite amount of at most {MAX_SPEND_USD} USD")
    return limits


def _caller(request: Request) -> Principal:
    return request.scope["asgi_llm"].principal  # type: ignore[no-any-return]


def _respond(request: Request, body: Any, status: int = 200) -> JSONResponse:
    headers = {k.decode(): v.decode() for k, v in gateway_headers(request.scope["asgi_llm"])}
    return JSONResponse(body, status_code=status, headers=headers)


def _static_public(p: Principal) -> dict[str, Any]:
    from asgi_llm.auth.keys import PrincipalLimits

    limits = p.limits if isinstance(p.limits, PrincipalLimits) else PrincipalLimits()
    return {
        "id": p.key_id, "object": "api_key", "org": p.org, "name": p.name, "prefix": None,
        "scopes": sorted(p.scopes), "models": ["*"] if p.models is None else sorted(p.models),
        "limits": limits.key.model_dump(mode="json", exclude_none=True),
        "model_limits": {m: v.model_dump(mode="json", exclude_none=True) for m, v in sorted(limits.models.items())},
        "created_at": None, "expires_at": None, "revoked_at": None, "created_by": None, "source": "recipe",
    }


def key_routes(ring: KeyRing, *, model_names: list[str]) -> list[BaseRoute]:
    """The routes, bound to ``ring``; ``model_names`` validates allow-lists."""
    known = set(model_names)

    async def create(request: Request) -> JSONResponse:
        caller = _caller(request)
        try:
            # parse_json_object, not pydantic's JSON mode: duplicate keys, NaN and
            # 10k-deep nesting are refused like on every other route.
            body = CreateKey.model_validate(parse_json_object(await request.body()))
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or None
            raise InvalidRequestError(f"Invalid key request: {loc + ': ' if loc else ''}{err['msg']}.", param=loc) from None
        org = body.org
        if caller.org == SUPER_ORG:
            if org is None:
                raise InvalidRequestError("Say which org the key belongs to: \"org\" is required for a super admin.", param="org")
        elif org is None:
            org = caller.org
        elif org != caller.org:
            raise PermissionDeniedError("An org admin can only create keys for its own org.")
        bad_scopes = sorted(set(body.scopes) - {"inference", "admin", "node"})
        if bad_scopes:
            raise InvalidRequestError(f"Unknown scope(s) {bad_scopes}; scopes are inference, admin, node.", param="scopes")
        for field, names in (("models", body.models), ("model_limits", list(body.model_limits))):
            unknown = sorted(n for n in names if n != "*" and n not in known)
            if unknown:
                raise InvalidRequestError(f"Unknown model(s) {unknown} in {field}.", param=field)
        expires_at = body.expires_at
        if body.expires_in_s is not None:
            expires_at = time.time() + body.expires_in_s
        key, record = await ring.create_key(
            org=org, name=body.name, scopes=body.scopes, models=body.models, limits=body.limits,
            model_limits=body.model_limits, expires_at=expires_at, created_by=caller.key_id,
        )
        return _respond(request, {**record.public(), "key": key}, 201)

    async def list_keys(request: Request) -> JSONResponse:
        caller = _caller(request)
        org = request.query_params.get("org") if caller.org == SUPER_ORG else caller.org
        data = [r.public() for r in await ring.list_keys(org=org)]
        if caller.org == SUPER_ORG:
            statics = [p for p in ring.static_principals if org is None or p.org == org]
        else:
            statics = [p for p in ring.static_principals if p.org == caller.org]
        return _respond(request, {"object": "list", "data": [*(_static_public(p) for p in statics), *data]})

    async def _owned(request: Request) -> Any:
        caller = _caller(request)
        key_id = request.path_params["key_id"]
        if key_id.startswith(("static:", "admin:")):
            for p in ring.static_principals:
                if p.key_id == key_id and (caller.org in (SUPER_ORG, p.org)):
                    return p
            raise NotFoundError(f"No such key: {key_id}.")
        record = await ring.get_key(key_id)
        if record is None or caller.org not in (SUPER_ORG, record.org):
            raise NotFoundError(f"No such key: {key_id}.")
        return record

    async def get_key(request: Request) -> JSONResponse:
        found = await _owned(request)
        return _respond(request, _static_public(found) if isinstance(found, Principal) else found.public())

    async def revoke(request: Request) -> JSONResponse:
        found = await _owned(request)
        if isinstance(found, Principal):
            raise InvalidRequestError(
                f"Key {found.key_id} is declared in the recipe; remove it there to revoke it.", code="recipe_key"
            )
        record = await ring.revoke_key(found.id)
        assert record is not None
        return _respond(request, {**record.public(), "revoked": True})

    return [
        Route("/admin/keys", create, methods=["POST"]),
        Route("/admin/keys", list_keys, methods=["GET"]),
        Route("/admin/keys/{key_id}", get_key, methods=["GET"]),
        Route("/admin/keys/{key_id}", revoke, methods=["DELETE"]),
    ]

