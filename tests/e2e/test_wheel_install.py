"""The wheel as users install it: built from the sources, installed into a fresh venv
outside the checkout, then `asgi-llm demo`, `asgi-llm serve` (no --config) and
`asgi-llm init` run from empty directories.

Dependencies come from the package index (pip's cache makes reruns quick). Deselect with
``-m 'not wheel'`` on a machine that cannot reach an index.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from asgi_llm.testing.processes import free_port, managed_process
from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.wheel, pytest.mark.timeout(900)]

# Spawned processes must import the INSTALLED package, never this checkout.
_CLEAN = {"PYTHONPATH": "", "PYTHONHOME": "", "VIRTUAL_ENV": "", "PYTHONNOUSERSITE": "1"}


@dataclass
class Installed:
    """A fresh venv with the wheel installed."""

    venv: Path
    wheel: Path

    @property
    def bin(self) -> Path:
        return self.venv / ("Scripts" if os.name == "nt" else "bin")

    @property
    def asgi_llm(self) -> str:
        return str(self.bin / "asgi-llm")

    def env(self) -> dict[str, str]:
        return {**os.environ, **_CLEAN, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}

    def in_dir(self, cwd: Path, *args: str) -> list[str]:
        """``asgi-llm ARGS`` started in ``cwd`` (managed_process has no cwd: a POSIX sh changes to it, then execs)."""
        return ["/bin/sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", str(cwd), self.asgi_llm, *args]

    def run(self, *args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.asgi_llm, *args], cwd=cwd, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)


def _pip(python: Path | str, *args: str, cwd: Path, timeout: float = 600) -> None:
    res = subprocess.run([str(python), "-m", "pip", *args], cwd=cwd, env={**os.environ, **_CLEAN},
                         capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"pip {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """Build the wheel from a copy of the sources (setuptools writes build/ and *.egg-info
    next to them: never into the checkout) and install it into a new venv."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "asgi_llm", src / "asgi_llm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = root / "dist"
    _pip(sys.executable, "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(src), cwd=root)
    wheels = list(dist.glob("asgi_llm-*.whl"))
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    res = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **_CLEAN})
    assert res.returncode == 0, res.stderr
    inst = Installed(venv=venv, wheel=wheels[0])
    _pip(inst.bin / "python", "install", "--quiet", str(wheels[0]), cwd=root)
    yield inst


def _empty_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


class TestWheelInstall:
    def test_imports_the_installed_copy(self, installed: Installed, tmp_path: Path) -> None:
        """The venv imports asgi_llm from its own site-packages, with the standalone recipe as package data."""
        res = subprocess.run(
            [str(installed.bin / "python"), "-c",
             "import asgi_llm, asgi_llm.recipes as r; print(asgi_llm.__file__); print(r.STANDALONE.is_file())"],
            cwd=_empty_dir(tmp_path, "cwd"), env=installed.env(), capture_output=True, text=True, timeout=60,
        )
        assert res.returncode == 0, res.stderr
        module_file, has_recipe = res.stdout.split()
        assert Path(module_file).resolve().is_relative_to(installed.venv.resolve())
        assert has_recipe == "True"

    def test_demo_passes(self, installed: Installed, tmp_path: Path) -> None:
        """`asgi-llm demo` from the plain install (no [dev]) passes every check."""
        res = installed.run("demo", cwd=_empty_dir(tmp_path, "demo"), timeout=600)
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr[-5000:]}"
        summary = re.search(r"^(\d+) passed, (\d+) failed$", res.stdout, re.M)
        assert summary is not None, res.stdout
        assert int(summary.group(1)) >= 5 and summary.group(2) == "0", res.stdout
        assert "No module named" not in res.stdout + res.stderr

    def test_serve_without_config_from_an_empty_dir(self, installed: Installed, tmp_path: Path) -> None:
        """`asgi-llm serve` with no --config in an empty directory serves the packaged recipe."""
        cwd = _empty_dir(tmp_path, "serve")
        port = free_port()
        with managed_process(installed.in_dir(cwd, "serve", "--port", str(port), "--log-level", "warning"),
                             ready_url=f"http://127.0.0.1:{port}/healthz", env={**_CLEAN, "PATH": installed.env()["PATH"]},
                             name="wheel-serve", timeout=60) as proc:
            with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                assert http.get("/healthz").status_code == 200
                models = http.get("/v1/models")
                assert models.status_code == 200
                assert {"chat", "chat-b", "embed"} <= {m["id"] for m in models.json()["data"]}
            log = proc.log_text()
        packaged = re.search(r"no --config, serving (\S+)", log)
        assert packaged is not None, log
        assert Path(packaged.group(1)).is_relative_to(installed.venv.resolve())
        assert packaged.group(1).endswith(os.path.join("asgi_llm", "recipes", "standalone.yaml"))

    def test_init_then_serve_uses_the_local_copy(self, installed: Installed, tmp_path: Path) -> None:
        """`asgi-llm init` writes ./recipes/standalone.yaml (refusing to overwrite it); serve then prefers it."""
        cwd = _empty_dir(tmp_path, "init")
        first = installed.run("init", cwd=cwd)
        assert first.returncode == 0, first.stderr
        written = cwd / "recipes" / "standalone.yaml"
        assert written.read_bytes() == (REPO / "recipes" / "standalone.yaml").read_bytes()
        written.write_text(written.read_text().replace("  chat-b:\n", "  chat-local:\n"))
        again = installed.run("init", cwd=cwd)
        assert again.returncode == 1 and "already exists" in again.stderr
        assert "chat-local" in written.read_text()
        check = installed.run("check", "recipes/standalone.yaml", cwd=cwd)
        assert check.returncode == 0 and "chat-local" in check.stdout, check.stderr
        port = free_port()
        with managed_process(installed.in_dir(cwd, "serve", "--port", str(port), "--log-level", "warning"),
                             ready_url=f"http://127.0.0.1:{port}/healthz", env={**_CLEAN, "PATH": installed.env()["PATH"]},
                             name="wheel-serve-local", timeout=60):
            with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert "chat-local" in ids and "chat-b" not in ids
