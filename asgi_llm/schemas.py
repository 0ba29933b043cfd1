"""Wire models for the requests the gateway accepts.

They check what the gateway itself relies on (types of ``model``, ``messages``,
``stream``, ``max_tokens`` …) and nothing more: unknown fields are allowed and are
passed to the upstream untouched, so a new OpenAI parameter never needs a release of
ours. The body is parsed once; the validated object is never re-serialised — the
forwarded JSON is built from the parsed dict.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError

from asgi_llm.errors import InvalidRequestError

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
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


_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "chat": TypeAdapter(ChatCompletionRequest),
    "completions": TypeAdapter(CompletionRequest),
    "embeddings": TypeAdapter(EmbeddingRequest),
}


def validate_payload(endpoint: str, payload: Any) -> None:
    """Check a parsed body against the endpoint's model; raise an OpenAI-shaped 400.

    The message names the first offending field the way OpenAI does
    (``param="messages[0].role"``) and says what was expected.
    """
    if not isinstance(payload, dict):
        raise InvalidRequestError(
            f"The request body must be a JSON object, not {type(payload).__name__}.",
            code="invalid_request_body",
        )
    try:
        _ADAPTERS[endpoint].validate_python(payload)
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
