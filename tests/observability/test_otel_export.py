"""``observability.otel`` in ``asgi-llm serve``: spans reach a real OTLP/HTTP receiver.

A tiny HTTP server on 127.0.0.1 accepts ``POST /v1/traces`` (protobuf) and decodes it
with ``opentelemetry-proto``. A served gateway with a failing first target sends one
SERVER span per request and one CLIENT span per attempt, with the GenAI attributes, the
recipe's headers, and — SIGTERM right after the requests, with a 60 s batch delay — the
spans still queued are exported at shutdown. The console exporter prints spans.
"""

from __future__ import annotations

import http.server
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from asgi_llm.config import ConfigError, config_from_dict
from asgi_llm.observability.tracing import configure_tracing
from asgi_llm.testing.processes import FakeUpstreamHandle, gateway_process
from tests.conftest import UPSTREAM_KEYS

pytest.importorskip("opentelemetry.proto")

MODELS = {"providers": {"p": {"base_url": "http://127.0.0.1:9/v1"}}, "models": {"m": {"targets": [{"provider": "p", "model": "x"}]}}}


def _config(otel: object) -> Any:
    return config_from_dict({**MODELS, "observability": {"otel": otel}})


class Receiver:
    """An OTLP/HTTP traces receiver: decoded spans and the request headers it saw."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(min(length, 16 * 1024 * 1024))
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                with receiver.lock:
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    for rs in req.resource_spans:
                        for ss in rs.scope_spans:
                            receiver.spans.extend((rs.resource, s) for s in ss.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def wait_spans(self, n: int, timeout: float = 20) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if len(self.spans) >= n:
                    return list(self.spans)
            assert time.monotonic() < deadline, f"{len(self.spans)} spans received, expected {n}"
            time.sleep(0.05)


def _attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out


def _recipe(a: FakeUpstreamHandle, b: FakeUpstreamHandle, otel: str) -> str:
    return textwrap.dedent(f"""\
        providers:
          provider-a: {{base_url: "{a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"], timeout_s: 10}}
          provider-b: {{base_url: "{b.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-b']}"], timeout_s: 10}}
        models:
          fo:
            targets:
              - {{provider: provider-a, model: gpt-4o-mini}}
              - {{provider: provider-b, model: llama-3.1-8b}}
        routing: {{health: {{failure_threshold: 1000000, probe_interval_s: 0}}}}
        observability: {{otel: {otel}}}
        """)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.mark.e2e
class TestOtlpExport:
    @pytest.mark.parametrize("source", ["recipe", "env"])
    def test_spans_per_request_and_attempt_reach_an_otlp_receiver(
            self, source: str, receiver: Receiver, upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle,
            tmp_path: Path) -> None:
        """A failover (503 then ok) and a stream: 2 request spans + 3 attempt spans, GenAI
        attributes, the headers (from the recipe, or ``otel: true`` and the standard
        ``OTEL_*`` variables); exported at SIGTERM despite a 60 s batch delay."""
        env = {"OTEL_BSP_SCHEDULE_DELAY": "60000"}
        if source == "recipe":
            otel = (f'{{exporter: otlp, endpoint: "http://127.0.0.1:{receiver.port}/v1/traces", '
                    f'headers: {{x-otlp-token: "tok-123"}}, service_name: fleet-gw}}')
        else:
            otel = "true"
            env |= {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{receiver.port}/v1/traces",
                    "OTEL_EXPORTER_OTLP_HEADERS": "x-otlp-token=tok-123", "OTEL_SERVICE_NAME": "fleet-gw"}
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(_recipe(upstream_a, upstream_b, otel))
        upstream_a.add_faults({"kind": "status", "status": 503, "times": 1})
        with gateway_process(recipe, name="otel-gw", env=env) as gw:
            client = openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=20)
            try:
                first = client.chat.completions.create(model="fo", messages=[{"role": "user", "content": "hi"}])
                chunks = list(client.chat.completions.create(model="fo", messages=[{"role": "user", "content": "hi"}],
                                                            stream=True))
            finally:
                client.close()
            assert first.choices[0].message.content and chunks
            assert not receiver.spans  # queued (60 s delay): only the shutdown flush sends them
            gw.process.proc.terminate()
            gw.process.proc.wait(20)
        spans = receiver.wait_spans(5)
        kinds = {1: "internal", 2: "server", 3: "client"}
        server = [s for _, s in spans if kinds.get(s.kind) == "server"]
        client_spans = [s for _, s in spans if kinds.get(s.kind) == "client"]
        assert len(server) == 2 and len(client_spans) == 3, [(s.name, s.kind) for _, s in spans]
        for s in server:
            a = _attrs(s)
            assert s.name == "chat fo" and a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "fo"
            assert a["http.response.status_code"] == 200
        by_outcome = sorted((_attrs(s)["asgi_llm.outcome"], _attrs(s)["gen_ai.system"]) for s in client_spans)
        assert by_outcome[0][0] != "ok" and by_outcome[0][1] == "provider-a", by_outcome
        assert [o for o, _ in by_outcome].count("ok") == 2
        for s in client_spans:
            a = _attrs(s)
            parent = next(p for p in server if p.span_id == s.parent_span_id)
            assert parent.trace_id == s.trace_id
            assert {"gen_ai.request.model", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"} <= a.keys()
        services = {kv.value.string_value for r, _ in spans for kv in r.attributes if kv.key == "service.name"}
        assert services == {"fleet-gw"}
        assert all(h.get("x-otlp-token") == "tok-123" for h in receiver.headers)

    def test_console_exporter_prints_spans(self, upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle,
                                           tmp_path: Path) -> None:
        """``otel: {exporter: console}``: the request's span is printed by the served process."""
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(_recipe(upstream_a, upstream_b, "{exporter: console}"))
        with gateway_process(recipe, name="otel-console", env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as gw:
            client = openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=20)
            try:
                client.chat.completions.create(model="fo", messages=[{"role": "user", "content": "hi"}])
            finally:
                client.close()
            deadline = time.monotonic() + 10
            while '"name": "chat fo"' not in gw.process.log_text():
                assert time.monotonic() < deadline, gw.process.log_text()[-2000:]
                time.sleep(0.05)
            assert '"gen_ai.request.model": "fo"' in gw.process.log_text()


class TestOtelConfig:
    def test_recipe_options_validate(self) -> None:
        """``otel: true`` and an options block both validate; a non-HTTP endpoint is refused."""
        assert _config(True).observability.otel is True
        assert _config({"exporter": "console", "service_name": "gw"}).observability.otel.exporter == "console"
        with pytest.raises(ConfigError, match="otel.options.endpoint"):
            _config({"endpoint": "file:///etc/passwd"})
        with pytest.raises(ConfigError, match="otel.options.exporter"):
            _config({"exporter": "zipkin"})

    def test_off_and_none_install_nothing(self) -> None:
        """``otel: false`` and ``exporter: none`` (recipe or $OTEL_TRACES_EXPORTER) install no provider."""
        assert configure_tracing(False) is None
        assert configure_tracing(True, environ={"OTEL_TRACES_EXPORTER": "none"}) is None
        assert configure_tracing(_config({"exporter": "none"}).observability.otel, environ={}) is None

    def test_unknown_env_exporter_is_a_clear_error(self) -> None:
        """``OTEL_TRACES_EXPORTER=jaeger`` is refused with the supported names, not ignored."""
        with pytest.raises(ValueError, match="otlp, console or none"):
            configure_tracing(True, environ={"OTEL_TRACES_EXPORTER": "jaeger"})

    def test_a_mounted_gateway_leaves_the_hosts_provider_alone(self) -> None:
        """Building a gateway (what mounting does) with otel options installs no provider:
        its spans go to whatever provider the host app set up."""
        from opentelemetry import trace

        from asgi_llm.stack import build_gateway

        before = trace.get_tracer_provider()
        build_gateway(_config({"exporter": "console"}))
        assert trace.get_tracer_provider() is before
