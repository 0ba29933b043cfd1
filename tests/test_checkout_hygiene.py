"""The session check that fails a run which wrote into the checkout (tests/conftest.py),
and the default that keeps gateway processes out of the caller's directory."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, gateway_process
from tests.conftest import UPSTREAM_KEYS, checkout_changes, checkout_snapshot


def test_snapshot_sees_new_and_changed_files_but_not_tool_caches(tmp_path: Path) -> None:
    """A new file and a rewritten one are reported; __pycache__, .pytest_cache, .git and
    .venv* are not the tests' doing and are ignored."""
    (tmp_path / "kept.txt").write_text("a")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "rewritten.py").write_text("x = 1\n")
    before = checkout_snapshot(tmp_path)
    (tmp_path / "asgi-llm.db").write_bytes(b"ledger")
    (tmp_path / "pkg" / "rewritten.py").write_text("x = 22\n")
    for ignored in ("__pycache__", ".pytest_cache", ".git", ".venv-ci"):
        (tmp_path / ignored).mkdir()
        (tmp_path / ignored / "f").write_text("y")
    assert checkout_changes(before, checkout_snapshot(tmp_path)) == ["added: asgi-llm.db", "changed: pkg/rewritten.py"]


def test_edits_to_tracked_files_are_a_person_not_a_test(tmp_path: Path) -> None:
    """A tracked source file rewritten mid-run is not reported; an untracked one is."""
    (tmp_path / "src.py").write_text("a = 1\n")
    (tmp_path / "asgi-llm.db").write_bytes(b"old rows")
    before = checkout_snapshot(tmp_path)
    (tmp_path / "src.py").write_text("a = 22\n")
    (tmp_path / "asgi-llm.db").write_bytes(b"old rows + the suite's rows")
    assert checkout_changes(before, checkout_snapshot(tmp_path), frozenset({"src.py"})) == ["changed: asgi-llm.db"]


def test_an_unchanged_tree_reports_nothing(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    snap = checkout_snapshot(tmp_path)
    assert snap and checkout_changes(snap, checkout_snapshot(tmp_path)) == []


@pytest.mark.e2e
def test_gateway_process_keeps_relative_stores_out_of_the_callers_directory(
        tmp_path: Path, upstream_a: FakeUpstreamHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe with the default ledger (sqlite:///asgi-llm.db, relative) served by
    gateway_process from some directory leaves no database there."""
    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        providers:
          a: {{base_url: "{upstream_a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"]}}
        models:
          chat: {{targets: [{{provider: a, model: gpt-4o-mini}}]}}
        """))
    import httpx2

    with gateway_process(recipe, name="gateway-cwd") as gw:
        r = httpx2.post(gw.base_url + "/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
                        timeout=10)
        assert r.status_code == 200, r.text
    assert os.listdir(caller) == []
