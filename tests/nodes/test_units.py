"""Node building blocks without processes: metrics parsing, selectors, windows, secrets, tunnel framing."""

from __future__ import annotations

import json
import time

import anyio
import pytest

from asgi_llm.errors import UpstreamConnectionError
from asgi_llm.nodes.agent import parse_metrics
from asgi_llm.nodes.records import NodeRecord, call_secret, secret_hash, valid_window
from asgi_llm.nodes.registry import _matches
from asgi_llm.nodes.tunnel import TunnelConnection, TunnelTransport, encode_body


def _record(**kw: object) -> NodeRecord:
    base: dict[str, object] = {"id": "node_1", "name": "box", "org": "team-a", "credential_hash": "h"}
    base.update(kw)
    return NodeRecord(**base)  # type: ignore[arg-type]


class TestMetrics:
    """Engine load from Prometheus text."""

    def test_vllm_and_llamacpp_gauges(self) -> None:
        """vLLM and llama.cpp gauges map to queue_depth / running / kv_cache_usage, summed over labels."""
        text = (
            "# HELP vllm:num_requests_waiting x\n"
            'vllm:num_requests_waiting{model_name="a"} 3.0\n'
            'vllm:num_requests_waiting{model_name="b"} 1.0\n'
            "vllm:num_requests_running 2\n"
            "llamacpp:kv_cache_usage_ratio 0.25\n"
            "unrelated_metric 99\n"
        )
        assert parse_metrics(text) == {"queue_depth": 4.0, "running": 2.0, "kv_cache_usage": 0.25}

    def test_garbage_is_ignored(self) -> None:
        """Unparseable lines and NaN values are skipped."""
        assert parse_metrics("vllm:num_requests_waiting NaN\nnot a metric line\n") == {}


class TestRecords:
    """Selectors, visibility, availability, secrets."""

    def test_selectors(self) -> None:
        """any, a bare name, name:, and label pairs (all must match)."""
        r = _record(labels={"gpu": "a100", "site": "lab"})
        assert _matches("any", r) and _matches("box", r) and _matches("name:box", r)
        assert _matches("label:gpu=a100", r) and _matches("label:gpu=a100,site=lab", r)
        assert not _matches("label:gpu=a100,site=home", r) and not _matches("other", r)

    def test_visibility(self) -> None:
        """Private to the owner unless shared by name or with everyone."""
        assert _record().visible_to("team-a") and not _record().visible_to("team-b")
        assert _record(shared_with=("team-b",)).visible_to("team-b")
        assert _record(shared_with=("*",)).visible_to("anyone")

    def test_availability_windows(self) -> None:
        """Windows are UTC and may wrap midnight; paused is never available."""
        noon = time.mktime((2025, 1, 1, 12, 0, 0, 0, 0, 0)) - time.timezone
        night = noon + 12 * 3600
        day = _record(availability={"mode": "windows", "windows": ["09:00-17:00"]})
        overnight = _record(availability={"mode": "windows", "windows": ["19:00-07:00"]})
        assert day.available_at(noon) and not day.available_at(night)
        assert overnight.available_at(night) and not overnight.available_at(noon)
        assert not _record(availability={"mode": "paused"}).available_at(noon)
        assert valid_window("19:00-07:00") and not valid_window("25:00-01:00") and not valid_window("soon")

    def test_secrets_are_keyed_hashes(self) -> None:
        """The stored hash depends on the pepper; the call secret changes with the credential."""
        assert secret_hash(b"p1" * 16, "nc-llm-x") != secret_hash(b"p2" * 16, "nc-llm-x")
        assert call_secret(b"p" * 32, "node_1", "h1") != call_secret(b"p" * 32, "node_1", "h2")


class TestTunnelFraming:
    """The gateway's side of the tunnel, against a scripted agent."""

    @pytest.mark.anyio
    async def test_multiplexed_responses_and_cancel(self) -> None:
        """Two concurrent requests get their own chunks; closing early sends a cancel frame."""
        sent: list[dict[str, object]] = []
        conn: TunnelConnection

        async def send_text(text: str) -> None:
            frame = json.loads(text)
            sent.append(frame)
            if frame["type"] == "request":
                rid = frame["id"]
                conn.feed({"type": "response", "id": rid, "status": 200, "headers": {"Content-Type": "text/plain"}})
                for part in (b"a", b"b"):
                    conn.feed({"type": "chunk", "id": rid, "data": encode_body(part + str(rid).encode())})
                if rid == 1:
                    conn.feed({"type": "end", "id": rid})

        conn = TunnelConnection(send_text, name="box")
        transport = TunnelTransport(lambda: conn, name="box")
        first = await transport.send("POST", "http://tunnel/v1/chat/completions", headers={}, body=b"{}")
        second = await transport.send("POST", "http://tunnel/v1/embeddings", headers={}, body=None)
        assert first.headers["content-type"] == "text/plain"
        assert await first.read() == b"a1b1"
        await first.aclose()
        assert [f["path"] for f in sent if f["type"] == "request"] == ["/v1/chat/completions", "/v1/embeddings"]
        await second.aclose()  # not finished: the agent is told to stop
        assert sent[-1] == {"type": "cancel", "id": 2}

    @pytest.mark.anyio
    async def test_oversized_frame_and_backlog_fail_the_request(self) -> None:
        """A frame over MAX_FRAME_CHARS, or more queued body than the cap, fails that request
        (connection error), the agent is told to cancel it, and later frames are dropped."""
        from asgi_llm.nodes.tunnel import MAX_FRAME_CHARS

        sent: list[dict[str, object]] = []
        conn: TunnelConnection

        async def send_text(text: str) -> None:
            frame = json.loads(text)
            sent.append(frame)
            if frame["type"] == "request":
                conn.feed({"type": "response", "id": frame["id"], "status": 200, "headers": {}})

        conn = TunnelConnection(send_text, name="box")
        big = await conn.request("POST", "/v1/x", {}, b"")
        conn.feed({"type": "chunk", "id": 1, "data": encode_body(b"ok")}, size=40)
        conn.feed({"type": "chunk", "id": 1, "data": "QUFB"}, size=MAX_FRAME_CHARS + 1)
        conn.feed({"type": "chunk", "id": 1, "data": encode_body(b"late")}, size=40)
        with pytest.raises(UpstreamConnectionError):
            await big.read()
        await big.aclose()
        assert sent[-1] == {"type": "cancel", "id": 1}
        assert conn.in_flight == 0
        # A consumer that does not keep up: 40 x 1 MiB frames queued, past the 32 MiB cap.
        slow = await conn.request("POST", "/v1/x", {}, b"")
        piece = encode_body(b"x" * (768 * 1024))
        for _ in range(60):
            conn.feed({"type": "chunk", "id": 2, "data": piece}, size=len(piece) + 40)
        assert conn.in_flight == 0
        with pytest.raises(UpstreamConnectionError):
            await slow.read()
        await slow.aclose()
        assert sent[-1] == {"type": "cancel", "id": 2}

    @pytest.mark.anyio
    async def test_read_at_most_stops_at_the_limit(self) -> None:
        """read_at_most returns None past the limit and the rest is cancelled, not buffered."""
        sent: list[dict[str, object]] = []
        conn: TunnelConnection

        async def send_text(text: str) -> None:
            frame = json.loads(text)
            sent.append(frame)
            if frame["type"] == "request":
                conn.feed({"type": "response", "id": frame["id"], "status": 200, "headers": {}})
                for _ in range(10):
                    conn.feed({"type": "chunk", "id": frame["id"], "data": encode_body(b"x" * 100)})

        conn = TunnelConnection(send_text, name="box")
        reply = await conn.request("POST", "/v1/x", {}, b"")
        assert await reply.read_at_most(250) is None
        await reply.aclose()
        assert sent[-1] == {"type": "cancel", "id": 1}
        whole = await conn.request("POST", "/v1/x", {}, b"")
        conn.feed({"type": "end", "id": 2})
        assert await whole.read_at_most(1000) == b"x" * 1000
        await whole.aclose()

    @pytest.mark.anyio
    async def test_dropped_socket_fails_open_requests(self) -> None:
        """A tunnel that closes mid-response raises a connection error (failover-able)."""
        conn: TunnelConnection

        async def send_text(text: str) -> None:
            frame = json.loads(text)
            if frame["type"] == "request":
                conn.feed({"type": "response", "id": frame["id"], "status": 200, "headers": {}})

        conn = TunnelConnection(send_text, name="box")
        reply = await conn.request("POST", "/v1/x", {}, b"")
        conn.close()
        with pytest.raises(UpstreamConnectionError):
            await reply.read()
        await reply.aclose()
        with pytest.raises(UpstreamConnectionError):
            await TunnelTransport(lambda: conn, name="box").send("POST", "http://tunnel/v1/x", headers={}, body=None)
        await anyio.sleep(0)
