"""OpenTelemetry GenAI semantic-convention names (our own copy: the upstream module is
still marked experimental and moves between releases)."""

from __future__ import annotations

GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
ERROR_TYPE = "error.type"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"

# Gateway-specific attributes (not part of the conventions).
ASGI_LLM_REQUEST_ID = "asgi_llm.request_id"
ASGI_LLM_ORG = "asgi_llm.org"
ASGI_LLM_ROUTE = "asgi_llm.route"
ASGI_LLM_ATTEMPT = "asgi_llm.attempt"
ASGI_LLM_ATTEMPTS = "asgi_llm.attempts"
ASGI_LLM_OUTCOME = "asgi_llm.outcome"
ASGI_LLM_CACHE = "asgi_llm.cache"
ASGI_LLM_COST_USD = "asgi_llm.cost_usd"
ASGI_LLM_TTFT_S = "asgi_llm.ttft_s"

OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
"""Endpoint → ``gen_ai.operation.name``."""
