"""``GET /openapi.json``: an OpenAPI 3.1 document for the gateway's ``/v1`` and ``/admin`` paths.

Built from the pydantic request models the gateway validates with
(:mod:`asgi_llm.schemas`, :class:`~asgi_llm.admin.keys.CreateKey`) and a small
hand-written table of paths. It describes what the gateway *accepts*; responses are
described only as far as the shared error shape goes. The node API (``/nodes/...``) is
for agents and is documented in :mod:`asgi_llm.nodes.routes`, not here.

Served without a key, like ``/healthz``: it holds no tenant data, only the API's shape.
Paths whose capability is not configured (admin without auth, nodes without a node
registry) answer 403/404 as they would without the document.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from pydantic import BaseModel
from starlette.types import Send

from asgi_llm._asgi import JSON_HEADERS, send_bytes

__all__ = ["OPENAPI_PATH", "PATHS", "openapi_document", "send_openapi"]

OPENAPI_PATH = "/openapi.json"

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}

_OBJECT = {"type": "object"}
_ORG = {"name": "org", "in": "query", "required": False, "schema": {"type": "string"},
        "description": "An org, for a super admin (an org admin is always scoped to its own)."}
_TIME = [{"name": n, "in": "query", "required": False, "schema": {"type": "string"},
          "description": "ISO 8601 time or epoch seconds."} for n in ("since", "until")]
_FORMAT = {"name": "format", "in": "query", "required": False, "schema": {"enum": ["json", "csv"]},
           "description": "csv, or json (the default; Accept: text/csv also asks for CSV)."}


def _q(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _path(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or {"type": "string"}}


_ENROLLMENT_TOKEN = {
    "type": "object", "additionalProperties": False,
    "properties": {"org": {"type": "string"}, "ttl_s": {"type": "number", "exclusiveMinimum": 0},
                   "labels": _OBJECT, "price": _OBJECT,
                   "shared_with": {"type": "array", "items": {"type": "string"}}, "availability": _OBJECT},
}
_NODE_PATCH = {
    "type": "object", "additionalProperties": False,
    "properties": {"labels": _OBJECT, "price": _OBJECT,
                   "shared_with": {"type": "array", "items": {"type": "string"}},
                   "availability": {"type": "object", "required": ["mode"],
                                    "properties": {"mode": {"enum": ["always", "windows", "paused"]}}}},
}
_ACCEPTANCE = {
    "type": "object", "required": ["accept"], "additionalProperties": False,
    "properties": {"org": {"type": "string"}, "accept": {"type": "array", "items": _OBJECT}},
}

# (path, method) → operation. "body": a pydantic model name in _MODELS or an inline schema.
PATHS: dict[str, dict[str, dict[str, Any]]] = {
    "/v1/chat/completions": {"post": {"summary": "Create a chat completion (OpenAI wire format).",
                                      "body": "ChatCompletionRequest", "auth": "inference"}},
    "/v1/completions": {"post": {"summary": "Create a completion (legacy).", "body": "CompletionRequest",
                                 "auth": "inference"}},
    "/v1/embeddings": {"post": {"summary": "Create embeddings.", "body": "EmbeddingRequest", "auth": "inference"}},
    "/v1/models": {"get": {"summary": "The models this key may use.", "auth": "inference"}},
    "/v1/models/{model}": {"get": {"summary": "One model.", "auth": "inference", "parameters": [_path("model")]}},
    "/admin/keys": {
        "post": {"summary": "Create an API key (the secret is shown once).", "body": "CreateKey", "status": "201"},
        "get": {"summary": "List keys.", "parameters": [_ORG]},
    },
    "/admin/keys/{key_id}": {
        "get": {"summary": "One key.", "parameters": [_path("key_id")]},
        "delete": {"summary": "Revoke a key.", "parameters": [_path("key_id")]},
    },
    "/admin/enrollment-tokens": {
        "post": {"summary": "Create a one-time node enrollment token.", "body": _ENROLLMENT_TOKEN, "status": "201"},
        "get": {"summary": "List enrollment tokens.", "parameters": [_ORG]},
    },
    "/admin/nodes": {"get": {"summary": "List nodes.", "parameters": [_ORG]}},
    "/admin/nodes/report": {"get": {"summary": "Per-node usage.", "parameters": [_ORG, *_TIME]}},
    "/admin/nodes/{node_id}": {
        "get": {"summary": "One node.", "parameters": [_path("node_id")]},
        "patch": {"summary": "Change a node's price, labels, sharing or availability.",
                  "parameters": [_path("node_id")], "body": _NODE_PATCH},
        "delete": {"summary": "Revoke a node.", "parameters": [_path("node_id")]},
    },
    "/admin/nodes/{node_id}/{action}": {"post": {
        "summary": "cordon, uncordon, drain, pause, resume or revoke a node.",
        "parameters": [_path("node_id"),
                       _path("action", {"enum": ["cordon", "uncordon", "drain", "pause", "resume", "revoke"]})],
    }},
    "/admin/node-acceptance": {
        "get": {"summary": "Which owners' shared nodes an org accepts.", "parameters": [_ORG]},
        "put": {"summary": "Replace an org's acceptance rules.", "body": _ACCEPTANCE},
    },
    "/admin/usage": {"get": {"summary": "Usage report.", "parameters": [
        _ORG, *_TIME, _FORMAT, {**_q("group_by", {"type": "string"}),
                                       "description": "Comma-separated: model, route, key, node, org, day."}]}},
    "/admin/usage/compare": {"get": {"summary": "The same prompt across routes.", "parameters": [
        _ORG, *_TIME, _FORMAT, _q("prompt_hash", {"type": "string"}),
        _q("min_routes", {"type": "integer", "minimum": 1, "maximum": 100})]}},
    "/admin/usage/top-prompts": {"get": {"summary": "The most frequent prompts.", "parameters": [
        _ORG, *_TIME, _FORMAT, _q("by", {"enum": ["cost", "count"]}),
        _q("limit", {"type": "integer", "minimum": 1, "maximum": 1000})]}},
    "/admin/usage/flush": {"post": {"summary": "Write the queued ledger rows now."}},
    "/admin/audit": {"get": {"summary": "Audit events.", "parameters": [
        _ORG, *_TIME, _FORMAT, *(_q(n, {"type": "string"}) for n in
                                 ("actor", "kind", "action", "verdict", "model", "request_id")),
        _q("after_seq", {"type": "integer", "minimum": 0}),
        _q("limit", {"type": "integer", "minimum": 1, "maximum": 10000})]}},
    "/admin/audit/verify": {"get": {"summary": "Verify the audit hash chain.", "parameters": [_ORG]}},
    "/admin/quarantine": {"get": {"summary": "Rows a store refused.", "parameters": [
        _ORG, _q("writer", {"enum": ["ledger", "audit"]}), _q("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
        _q("after_id", {"type": "integer", "minimum": 0})]}},
    "/admin/cache": {"delete": {"summary": "Purge cached responses.", "parameters": [
        _ORG, _q("model", {"type": "string"}), _q("all", {"type": "string"})]}},
    "/admin/explain": {"post": {
        "summary": "The routing plan a request would get, without calling anyone.",
        "parameters": [_ORG, _q("key", {"type": "string"})],
        "body": {"oneOf": [{"$ref": "#/components/schemas/ChatCompletionRequest"},
                           {"type": "object", "required": ["request"],
                            "properties": {"endpoint": {"enum": ["chat", "completions", "embeddings"]},
                                           "request": _OBJECT}}]},
    }},
}


def _models() -> dict[str, type[BaseModel]]:
    from asgi_llm.admin.keys import CreateKey
    from asgi_llm.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

    return {"ChatCompletionRequest": ChatCompletionRequest, "CompletionRequest": CompletionRequest,
            "EmbeddingRequest": EmbeddingRequest, "CreateKey": CreateKey}


def _operation(spec: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": spec["summary"]}
    if spec.get("parameters"):
        op["parameters"] = spec["parameters"]
    body = spec.get("body")
    if body is not None:
        schema = {"$ref": f"#/components/schemas/{body}"} if isinstance(body, str) else body
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    op["responses"] = {spec.get("status", "200"): {"description": "OK"},
                       "4XX": {"description": "A client error, in OpenAI's error shape.", **error}}
    op["security"] = [{"bearer": []}]
    op["tags"] = ["admin" if spec.get("auth") is None else "inference"]
    return op


@functools.cache
def openapi_document() -> bytes:
    """The document, serialised once per process."""
    from asgi_llm import __version__

    schemas: dict[str, Any] = {"Error": _ERROR}
    for name, model in _models().items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "asgi-llm gateway", "version": __version__,
                 "description": "OpenAI-compatible inference (/v1) and the admin API (/admin). Every "
                                "error is {\"error\": {\"message\", \"type\", \"param\", \"code\"}}."},
        "paths": {path: {method: _operation(spec) for method, spec in ops.items()} for path, ops in PATHS.items()},
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
    return json.dumps(doc, sort_keys=True).encode()


async def send_openapi(send: Send, headers: list[tuple[bytes, bytes]]) -> None:
    """Answer ``GET /openapi.json``."""
    await send_bytes(send, 200, openapi_document(), [*JSON_HEADERS, *headers])
