"""Packaging without building: the packaged recipe, the default recipe lookup, `asgi-llm init`,
and the metadata a plain install relies on. (tests/e2e/test_wheel_install.py builds and installs.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from asgi_llm.cli import app, default_recipe
from asgi_llm.config import load_config
from asgi_llm.recipes import STANDALONE
from tests.conftest import REPO


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in reqs}


class TestPackagedRecipe:
    def test_packaged_copy_equals_the_repository_recipe(self) -> None:
        """asgi_llm/recipes/standalone.yaml is byte-for-byte recipes/standalone.yaml (docs point at the latter)."""
        assert STANDALONE.read_bytes() == (REPO / "recipes" / "standalone.yaml").read_bytes()

    def test_packaged_recipe_is_valid(self) -> None:
        """The packaged recipe loads with its defaults (no environment needed)."""
        config = load_config(STANDALONE)
        assert {"chat", "chat-b", "embed"} <= set(config.models)

    def test_pyproject_ships_it_and_the_demo_client(self) -> None:
        """The wheel carries recipes/*.yaml, and the demo's client (openai) is a base dependency, not only [dev]."""
        meta = tomllib.loads((REPO / "pyproject.toml").read_text())
        assert "recipes/*.yaml" in meta["tool"]["setuptools"]["package-data"]["asgi_llm"]
        assert "openai" in _requirement_names(meta["project"]["dependencies"])


class TestDefaultRecipe:
    def test_empty_directory_gets_the_packaged_recipe(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """No ./recipes/standalone.yaml: serve falls back to the copy inside the package."""
        monkeypatch.chdir(tmp_path)
        assert default_recipe() == STANDALONE

    def test_local_recipe_wins(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """./recipes/standalone.yaml (a checkout, or `asgi-llm init`'s starter) is preferred: it is the one you edit."""
        (tmp_path / "recipes").mkdir()
        (tmp_path / "recipes" / "standalone.yaml").write_text("models: {}\n")
        monkeypatch.chdir(tmp_path)
        assert default_recipe().resolve() == (tmp_path / "recipes" / "standalone.yaml").resolve()

    def test_a_directory_named_like_the_recipe_is_not_a_recipe(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Only a file counts: a directory at ./recipes/standalone.yaml falls back to the packaged recipe."""
        (tmp_path / "recipes" / "standalone.yaml").mkdir(parents=True)
        monkeypatch.chdir(tmp_path)
        assert default_recipe() == STANDALONE


class TestInit:
    def test_writes_the_starter_where_serve_looks(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """`asgi-llm init` writes ./recipes/standalone.yaml, which `serve` (no --config) then uses."""
        monkeypatch.chdir(tmp_path)
        res = CliRunner().invoke(app, ["init"])
        assert res.exit_code == 0, res.output
        written = tmp_path / "recipes" / "standalone.yaml"
        assert written.read_bytes() == STANDALONE.read_bytes()
        assert "asgi-llm serve" in res.output and "--config" not in res.output
        assert default_recipe().resolve() == written.resolve()

    def test_named_path_and_parents(self, tmp_path: Path) -> None:
        """`asgi-llm init PATH` creates missing parents and says how to serve that path."""
        target = tmp_path / "a" / "b" / "gw.yaml"
        res = CliRunner().invoke(app, ["init", str(target)])
        assert res.exit_code == 0, res.output
        assert target.read_bytes() == STANDALONE.read_bytes()
        assert f"--config {target}" in res.output

    def test_refuses_to_overwrite(self, tmp_path: Path) -> None:
        """An existing file is left alone: exit 1 and a message naming it."""
        target = tmp_path / "mine.yaml"
        target.write_text("my edits\n")
        res = CliRunner().invoke(app, ["init", str(target)])
        assert res.exit_code == 1
        assert "already exists" in res.output
        assert target.read_text() == "my edits\n"

    def test_refuses_a_dangling_symlink(self, tmp_path: Path) -> None:
        """A symlink at PATH is not followed to create a file elsewhere."""
        target = tmp_path / "link.yaml"
        elsewhere = tmp_path / "elsewhere.yaml"
        target.symlink_to(elsewhere)
        res = CliRunner().invoke(app, ["init", str(target)])
        assert res.exit_code == 1
        assert not elsewhere.exists()

    def test_unwritable_place_is_a_message(self, tmp_path: Path) -> None:
        """A parent that is a file: exit 1 with a message, no traceback."""
        (tmp_path / "file").write_text("")
        res = CliRunner().invoke(app, ["init", str(tmp_path / "file" / "x.yaml")])
        assert res.exit_code == 1
        assert "cannot write" in res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)
