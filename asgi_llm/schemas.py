"""Wire models for the requests the gateway accepts.

They check what the gateway itself relies on (types of ``model``, ``messages``,
``stream``, ``max_tokens`` …) and nothing more: unknown fields are allowed and are
passed to the upstream untouched, so a new OpenAI parameter never needs a release of
ours. The body is parsed once; the validated object is never re-serialised — the
forwarded JSON is built from the parsed dict.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError

from asgi_llm.errors import InvalidRequestError

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "MAX_JSON_DEPTH",
    "parse_json",
    "parse_json_object",
    "validate_payload",
]

_Loose = ConfigDict(extra="allow")


class _ContentPart(BaseModel):
    model_config = _Loose
    type: StrictStr


class ChatMessage(BaseModel):
    """One chat message: ``role`` and (usually) ``content``; other fields pass through."""

    model_config = _Loose
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[_ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = _Loose
    include_usage: StrictBool | None = None


class _Base(BaseModel):
    model_config = _Loose
    model: Annotated[StrictStr, Field(min_length=1)]
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None


_PositiveInt = Annotated[StrictInt, Field(ge=1)]


class ChatCompletionRequest(_Base):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: _PositiveInt | None = None
    max_completion_tokens: _PositiveInt | None = None
    n: _PositiveInt | None = None
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_Base):
    """``POST /v1/completions`` (legacy)."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: _PositiveInt | None = None
    n: _PositiveInt | None = None


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``."""

    model_config = _Loose
    model: Annotated[StrictStr, Field(min_length=1)]
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


InferenceRequest = ChatCompletionRequest | CompletionRequest | EmbeddingRequest
"""A validated inference body (unknown fields kept in ``model_extra``)."""

_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "chat": TypeAdapter(ChatCompletionRequest),
    "completions": TypeAdapter(CompletionRequest),
    "embeddings": TypeAdapter(EmbeddingRequest),
}


def validate_payload(endpoint: str, payload: Any) -> InferenceRequest:
    """Check a parsed body against the endpoint's model and return the validated model;
    raise an OpenAI-shaped 400.

    The message names the first offending field the way OpenAI does
    (``param="messages[0].role"``) and says what was expected.
    """
    if not isinstance(payload, dict):
        raise InvalidRequestError(
            f"The request body must be a JSON object, not {type(payload).__name__}.",
            code="invalid_request_body",
        )
    try:
        return _ADAPTERS[endpoint].validate_python(payload)  # type: ignore[no-any-return]
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        param = _loc_to_param(err["loc"])
        if err["type"] == "missing":
            msg = f"Missing required parameter: '{param}'."
            code = "missing_required_parameter"
        else:
            msg = f"Invalid value for '{param}': {err['msg']}."
            code = "invalid_type" if "type" in err["type"] else "invalid_value"
        raise InvalidRequestError(msg, param=param, code=code) from None


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[_ContentPart]", "list[str]", "list[int]", "list[list[int]]", "int", "bool"):
            # pydantic names union branches in loc; they mean nothing to a client.
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


# ------------------------------------------------------------------ safe JSON parsing

MAX_JSON_DEPTH = 64
"""Deepest nesting of objects/arrays accepted in a JSON body (OpenAI requests need < 20)."""

_INT_LIMIT = 2**63
"""Integers must fit a signed 64-bit value: what every upstream and store can hold."""

_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _may_hold_surrogates(raw: bytes | str) -> bool:
    """Cheap pre-check: only bodies with a ``\\uD8xx``-style escape (or, for bytes, a
    UTF-8 lead byte of that range) can decode to a surrogate, so only they need every
    string checked."""
    if isinstance(raw, str):
        return True
    return b"\\ud" in raw or b"\\uD" in raw or b"\xed" in raw


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite("a number too large to represent")
    return value


class _NonFinite(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a JSON object naming one key twice is refused, not
    silently resolved (Python keeps the last value, other parsers the first: two layers
    reading one body must never see two different requests)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def parse_json(raw: bytes | str, *, what: str = "The request body", non_finite: bool = False) -> Any:
    """Parse a client's JSON, refusing what the parser accepts but nothing downstream can use.

    Every refusal is an OpenAI-shaped 400 (``invalid_json``) naming the problem:
    invalid JSON; ``NaN``/``Infinity``/``-Infinity`` (not JSON, though Python's parser
    takes them); numbers that overflow (``1e999``) or integers past 64 bits; lone UTF-16
    surrogates (``"\\ud800"``: they cannot be encoded to send upstream or store); nesting
    deeper than :data:`MAX_JSON_DEPTH` (which would otherwise exhaust the stack —
    here or in any layer that walks the payload).

    ``non_finite=True`` lets ``NaN``/``Infinity``, overflowing numbers and integers past
    64 bits through, for a caller that clamps every number itself (node heartbeats: Python's
    ``json.dumps`` writes an engine's NaN gauge as ``NaN``, and refusing the heartbeat
    would take a working node offline).

    A key named twice in one object (``{"model": "a", "model": "b"}``) is a 400 too, as
    OpenAI's API answers it: which value "wins" differs between parsers.
    """
    try:
        value = (json.loads(raw, object_pairs_hook=_unique_object) if non_finite
                 else json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float,
                                 object_pairs_hook=_unique_object))
    except _DuplicateKey as exc:
        shown = exc.key[:64].encode("unicode_escape").decode() + ("..." if len(exc.key) > 64 else "")
        raise InvalidRequestError(
            f"{what} names the key {shown!r} twice in one object; send each key once.", code="invalid_json"
        ) from None
    except _NonFinite as exc:
        if exc.name.startswith("a number"):
            message = f"{what} contains {exc.name}; send a finite number."
        else:
            message = f"{what} contains {exc.name}, which is not valid JSON; send a finite number or null."
        raise InvalidRequestError(message, code="invalid_json") from None
    except RecursionError:
        raise InvalidRequestError(
            f"{what} is nested too deeply; at most {MAX_JSON_DEPTH} levels of objects and arrays are accepted.",
            code="invalid_json",
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        detail = str(exc)
        if "integer string conversion" in detail:
            detail = "a number has too many digits"
        raise InvalidRequestError(f"{what} is not valid JSON: {detail}.", code="invalid_json") from None
    try:
        _check_tree(value, what, strings=_may_hold_surrogates(raw), ints=not non_finite)
    except _WideIntError as exc:
        exc.param = _wide_int_param(value)  # name the field to fix
        raise
    return value


def parse_json_object(raw: bytes, *, what: str = "The request body", non_finite: bool = False) -> dict[str, Any]:
    """:func:`parse_json` for the admin and node routes' bodies: empty is ``{}``, and
    anything but a JSON object is a 400."""
    if not raw:
        return {}
    body = parse_json(raw, what=what, non_finite=non_finite)
    if not isinstance(body, dict):
        raise InvalidRequestError(f"{what} must be a JSON object.", code="invalid_json")
    return body


def _check_tree(value: Any, what: str, *, strings: bool, ints: bool = True) -> None:
    """Depth (always), integer range (when ``ints``) and lone surrogates (when
    ``strings``), iteratively."""
    if ints or type(value) is not int:
        _check_scalar(value, what, strings)
    if not isinstance(value, dict | list):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequestError(
                f"{what} is nested too deeply; at most {MAX_JSON_DEPTH} levels of objects and arrays are accepted.",
                code="invalid_json",
            )
        if type(node) is dict:
            if strings:
                for key in node:
                    _check_scalar(key, what, strings)
            items = node.values()
        else:
            items = node
        for item in items:
            kind = type(item)
            if kind is dict or kind is list:
                stack.append((item, depth + 1))
            elif kind is int:
                if ints and not -_INT_LIMIT <= item < _INT_LIMIT:
                    _check_scalar(item, what, strings)
            elif strings and kind is str:
                _check_scalar(item, what, strings)


def _check_scalar(item: Any, what: str, strings: bool) -> None:
    kind = type(item)
    if kind is str:
        if strings and _SURROGATE.search(item) is not None:
            raise InvalidRequestError(
                f"{what} contains a lone UTF-16 surrogate (such as \\ud800) in a string; "
                "send valid Unicode text (surrogates must come in pairs).",
                code="invalid_json",
            )
    elif kind is int and not -_INT_LIMIT <= item < _INT_LIMIT:
        raise _WideIntError(
            f"{what} contains an integer outside the 64-bit range; send a smaller number.", code="invalid_json"
        )


class _WideIntError(InvalidRequestError):
    """An integer past 64 bits (:func:`parse_json` then names where it sits)."""


def _wide_int_param(value: Any) -> str | None:
    """Where the first integer past 64 bits sits (``limits.rpm``, ``messages[0].seed``), so
    the 400 names the field to fix; ``None`` at the top level or past the depth bound."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        node, loc = stack.pop()
        if type(node) is int:
            if not -_INT_LIMIT <= node < _INT_LIMIT:
                return _loc_to_param(loc) if loc else None
            continue
        if len(loc) >= MAX_JSON_DEPTH:
            continue
        if type(node) is dict:
            stack.extend((v, (*loc, k)) for k, v in reversed(node.items()))
        elif type(node) is list:
            stack.extend((v, (*loc, i)) for i, v in reversed(list(enumerate(node))))
    return None
