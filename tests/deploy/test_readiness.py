"""/readyz for a fleet: a shared-store outage is "degraded" (200), a draining process is 503.

In process: a gateway whose store check fails answers 200 ``degraded`` with the problem.
For real: ``asgi-llm serve`` with ``server.drain_notice_s`` answers ``/readyz`` 503
``draining`` right after SIGTERM while it still serves requests, then exits by itself.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from asgi_llm.endpoints import GatewayEndpoints, mark_draining
from asgi_llm.middleware.context import ContextMiddleware
from asgi_llm.middleware.errors import ErrorMiddleware
from asgi_llm.routing.router import Router
from asgi_llm.testing.processes import gateway_process
from tests.harness import call

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _app(*checks):  # type: ignore[no-untyped-def]
    async def inference(scope, receive, send):  # type: ignore[no-untyped-def]  # pragma: no cover - not called
        raise AssertionError

    endpoints = GatewayEndpoints(inference=inference, router=Router([]), readiness=list(checks))
    return ErrorMiddleware(ContextMiddleware(endpoints)), endpoints


@pytest.mark.anyio
class TestReadyz:
    async def test_shared_store_outage_is_degraded_not_unready(self) -> None:
        """Every replica shares the store: 200 degraded (problems listed), so a balancer keeps the pool."""
        async def down() -> str:
            return "state store unreachable: connection refused"

        async def up() -> None:
            return None

        app, _ = _app(down, up)
        rec = await call(app, method="GET", path="/readyz")
        assert rec.status == 200
        assert rec.json() == {"status": "degraded", "problems": ["state store unreachable: connection refused"]}
        app, _ = _app(up)
        assert (await call(app, method="GET", path="/readyz")).json() == {"status": "ready"}

    async def test_draining_is_503_and_liveness_stays_up(self) -> None:
        """mark_draining (serve on SIGTERM) finds the endpoints through the middlewares: /readyz 503, /healthz 200."""
        app, endpoints = _app()
        assert mark_draining(app) and endpoints.draining
        rec = await call(app, method="GET", path="/readyz")
        assert rec.status == 503 and rec.json() == {"status": "draining"}
        assert (await call(app, method="GET", path="/healthz")).status == 200
        assert mark_draining(object()) is False


def _get(url: str) -> tuple[int, dict]:
    try:
        with _OPENER.open(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


@pytest.mark.e2e
def test_sigterm_gives_notice_on_readyz_then_exits(tmp_path: Path) -> None:
    """SIGTERM with drain_notice_s: 2 → /readyz 503 at once, /v1/models still served, then a clean exit."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text('providers: {p: {base_url: "http://127.0.0.1:9/v1"}}\n'
                      'models: {m: {targets: [{provider: p, model: x}]}}\n'
                      'stores: {ledger: "sqlite:///ledger.db"}\n'
                      'server: {drain_notice_s: 2, drain_timeout_s: 5}\n')
    with gateway_process(recipe, name="drain-notice") as gw:
        assert _get(gw.url + "/readyz")[0] == 200
        sent = time.monotonic()
        gw.process.proc.send_signal(signal.SIGTERM)
        deadline = sent + 1.5
        while _get(gw.url + "/readyz")[0] != 503:
            assert time.monotonic() < deadline, "/readyz did not turn 503 after SIGTERM"
            time.sleep(0.02)
        assert _get(gw.url + "/readyz") == (503, {"status": "draining"})
        assert _get(gw.base_url + "/models")[0] == 200  # still serving during the notice
        gw.process.proc.wait(15)
        assert time.monotonic() - sent >= 2  # it waited out the notice
        log = gw.process.log_text()
    assert "Traceback" not in log, log[-2000:]
