"""``asgi-llm demo``: the smoke checklist, offline, against real local processes.

It starts three fake OpenAI-compatible upstreams (provider A, provider B, and a local
"node"), writes a recipe for them, serves it with ``asgi-llm serve`` in a child
process, and runs the checklist with the official ``openai`` SDK — one line per check,
exit status 1 if any fails. Later capabilities add their checks to :data:`CHECKS`.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHECKS", "DemoEnv", "run_demo"]


@dataclass
class DemoEnv:
    """What a check can use: the gateway's base URL and the fake upstreams by name."""

    base_url: str
    upstreams: dict[str, object]

    def client(self, **kwargs: object):  # type: ignore[no-untyped-def]
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key="demo", max_retries=0, timeout=20, **kwargs)  # type: ignore[arg-type]


def _recipe(urls: dict[str, str]) -> str:
    return f"""\
providers:
  provider-a: {{kind: openai, base_url: "{urls['provider-a']}", api_keys: ["sk-demo-a"], timeout_s: 10, ttft_timeout_s: 5}}
  provider-b: {{kind: openai, base_url: "{urls['provider-b']}", api_keys: ["sk-demo-b"], timeout_s: 10, ttft_timeout_s: 5}}
  node-1:     {{kind: openai, base_url: "{urls['node-1']}", timeout_s: 10, ttft_timeout_s: 5}}
models:
  demo-a:    {{targets: [{{provider: provider-a, model: gpt-4o-mini, price: {{input: 0.15, output: 0.60}}}}]}}
  demo-b:    {{targets: [{{provider: provider-b, model: llama-3.1-8b, price: {{input: 0.05, output: 0.08}}}}]}}
  demo-node: {{targets: [{{provider: node-1, model: "llama3.1:8b", price: {{input: 0, output: 0}}}}]}}
  chat:
    strategy: priority
    targets:
      - {{provider: provider-a, model: gpt-4o-mini, price: {{input: 0.15, output: 0.60}}}}
      - {{provider: provider-b, model: llama-3.1-8b, price: {{input: 0.05, output: 0.08}}}}
"""


def check_every_route(env: DemoEnv) -> str:
    """1. 200 from every route: provider A, provider B, and the local node."""
    client = env.client()
    seen = []
    try:
        for model, upstream in (("demo-a", "provider-a"), ("demo-b", "provider-b"), ("demo-node", "node-1")):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "ping"}]
            )
            reply = raw.parse()
            route = raw.headers.get("x-asgi-llm-route", "")
            text = reply.choices[0].message.content or ""
            if raw.status_code != 200 or not route.startswith(upstream + "/") or f"Hello from {upstream}" not in text:
                raise AssertionError(f"{model}: status {raw.status_code}, route {route!r}, reply {text!r}")
            # The same route, streamed.
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "ping"}], stream=True
            )
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            if streamed != text:
                raise AssertionError(f"{model}: streamed {streamed!r} != {text!r}")
            seen.append(f"{model}→{route}")
    finally:
        client.close()
    return ", ".join(seen)


CHECKS: list[Callable[[DemoEnv], str]] = [check_every_route]
"""The smoke checklist, in order. Each returns a short detail line or raises."""


def run_demo(*, keep_running: bool = False, out=sys.stdout) -> int:  # type: ignore[no-untyped-def]
    """Run the checklist; return the process exit status (0 = every check passed)."""
    from asgi_llm.testing.processes import fake_upstream, free_port, managed_process

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="asgi-llm-demo-") as tmp:
        say("asgi-llm demo: starting fake upstreams (provider-a, provider-b, node-1) and a gateway …")
        upstreams = {
            name: stack.enter_context(fake_upstream(name, api_key=key))
            for name, key in (("provider-a", "sk-demo-a"), ("provider-b", "sk-demo-b"), ("node-1", None))
        }
        recipe = Path(tmp) / "demo.yaml"
        recipe.write_text(_recipe({n: h.base_url for n, h in upstreams.items()}))  # type: ignore[attr-defined]
        port = free_port()
        stack.enter_context(
            managed_process(
                [sys.executable, "-m", "asgi_llm.cli", "serve", "--config", str(recipe), "--port", str(port),
                 "--log-level", "warning"],
                ready_url=f"http://127.0.0.1:{port}/healthz",
                name="gateway",
            )
        )
        env = DemoEnv(base_url=f"http://127.0.0.1:{port}/v1", upstreams=upstreams)
        say(f"gateway: {env.base_url}")
        failed = 0
        for check in CHECKS:
            title = (check.__doc__ or check.__name__).strip().splitlines()[0]
            t0 = time.perf_counter()
            try:
                detail = check(env)
            except Exception as exc:  # noqa: BLE001 - a failed check is reported, not raised
                failed += 1
                say(f"FAIL  {title} — {type(exc).__name__}: {exc}")
                traceback.print_exc(file=sys.stderr)
            else:
                say(f"ok    {title} ({(time.perf_counter() - t0) * 1000:.0f} ms) — {detail}")
        say(f"{len(CHECKS) - failed} passed, {failed} failed")
        if keep_running:
            say(f"gateway left running at {env.base_url}; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 1 if failed else 0
