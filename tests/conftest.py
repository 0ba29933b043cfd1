"""Shared fixtures: anyio backends, real fake-upstream processes, a real gateway process.

Every in-process async test runs under asyncio *and* trio (the core must run on both;
under trio the transport is httpx2, under asyncio aiohttp). End-to-end fixtures start
real processes on 127.0.0.1 and are shared per session; each test starts from clean
fake-upstream state (no faults, zeroed stats).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from asgi_llm.testing.processes import FakeUpstreamHandle, fake_upstream, free_port, gateway_process

UPSTREAM_KEYS = {"provider-a": "sk-upstream-a", "provider-b": "sk-upstream-b"}


@pytest.fixture(params=[pytest.param("asyncio", id="asyncio"), pytest.param("trio", id="trio")])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def _upstream_a() -> Iterator[FakeUpstreamHandle]:
    with fake_upstream("provider-a", api_key=UPSTREAM_KEYS["provider-a"], models=["gpt-4o-mini", "text-embedding-3-small"]) as h:
        yield h


@pytest.fixture(scope="session")
def _upstream_b() -> Iterator[FakeUpstreamHandle]:
    with fake_upstream("provider-b", api_key=UPSTREAM_KEYS["provider-b"], models=["llama-3.1-8b"]) as h:
        yield h


@pytest.fixture
def upstream_a(_upstream_a: FakeUpstreamHandle) -> Iterator[FakeUpstreamHandle]:
    """Fake provider A (requires its upstream key), clean for this test."""
    _upstream_a.reset()
    yield _upstream_a
    _upstream_a.reset()


@pytest.fixture
def upstream_b(_upstream_b: FakeUpstreamHandle) -> Iterator[FakeUpstreamHandle]:
    """Fake provider B, clean for this test."""
    _upstream_b.reset()
    yield _upstream_b
    _upstream_b.reset()


def gateway_recipe(a: FakeUpstreamHandle, b: FakeUpstreamHandle, ledger: Path | str = ":memory:") -> str:
    """The recipe the e2e gateway serves. ``tight`` shares provider A's server with
    short limits, for timeout tests."""
    return textwrap.dedent(
        f"""\
        providers:
          provider-a: {{base_url: "{a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"], timeout_s: 10, ttft_timeout_s: 5}}
          provider-b: {{base_url: "{b.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-b']}"], timeout_s: 10, ttft_timeout_s: 5}}
          tight:      {{base_url: "{a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"], timeout_s: 1.5, ttft_timeout_s: 1, idle_timeout_s: 1}}
          nowhere:    {{base_url: "http://127.0.0.1:{free_port()}/v1", connect_timeout_s: 1}}
          badkey:     {{base_url: "{a.base_url}", api_keys: ["sk-wrong"]}}
          limited:    {{base_url: "{a.base_url}", api_keys: ["{UPSTREAM_KEYS['provider-a']}"]}}
        models:
          chat:     {{targets: [{{provider: provider-a, model: gpt-4o-mini}}]}}
          chat-b:   {{targets: [{{provider: provider-b, model: llama-3.1-8b}}]}}
          embed:    {{targets: [{{provider: provider-a, model: text-embedding-3-small}}]}}
          tight:    {{targets: [{{provider: tight, model: tight-model}}]}}
          nowhere:  {{targets: [{{provider: nowhere, model: x}}]}}
          badkey:   {{targets: [{{provider: badkey, model: x}}]}}
          limited:  {{targets: [{{provider: limited, model: limited-model}}]}}
        server: {{max_body_bytes: 65536}}
        stores: {{ledger: "sqlite:///{ledger}"}}
        # Shared by many tests: breakers would carry one test's failures into the next.
        # Breaker behaviour is tested with gateways of its own (tests/e2e/test_failover.py).
        routing: {{health: {{failure_threshold: 1000000, probe_interval_s: 0}}}}
        """
    )


@pytest.fixture(scope="session")
def gateway_url(_upstream_a: FakeUpstreamHandle, _upstream_b: FakeUpstreamHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real gateway process (``asgi-llm serve``) in front of the fake upstreams; yields its ``/v1`` URL."""
    recipe = tmp_path_factory.mktemp("gateway") / "recipe.yaml"
    recipe.write_text(gateway_recipe(_upstream_a, _upstream_b, recipe.parent / "ledger.db"))
    with gateway_process(recipe, name="gateway") as gw:
        yield gw.base_url


@pytest.fixture
def client(gateway_url: str, upstream_a: FakeUpstreamHandle, upstream_b: FakeUpstreamHandle) -> Iterator[object]:
    """The official openai SDK pointed at the gateway (no SDK retries: we see every error)."""
    import openai

    c = openai.OpenAI(base_url=gateway_url, api_key="sk-client", max_retries=0, timeout=20)
    yield c
    c.close()


REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- #
# Tests never write into the checkout
# --------------------------------------------------------------------------- #
# A test that serves a recipe with the default ``stores.ledger`` (``sqlite:///asgi-llm.db``)
# from the repo directory writes its ledger rows into the very file a user's
# ``asgi-llm serve`` uses. The session records every file in the checkout at the start
# and fails the run if one was added or changed by the end.

_CHECKOUT_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "node_modules"}
"""Directories Python, pytest and tools write on their own (not the tests' doing)."""


def _skip_dir(name: str) -> bool:
    return name in _CHECKOUT_SKIP_DIRS or name.startswith(".venv") or name.endswith(".egg-info")


def checkout_snapshot(root: Path = REPO) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (relative path -> (size, mtime_ns)), minus tool caches."""
    files: dict[str, tuple[int, int]] = {}
    for here, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not _skip_dir(d)]
        for name in names:
            path = Path(here, name)
            try:
                st = path.lstat()
            except OSError:
                continue
            files[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return files


def checkout_changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]],
                     tracked: frozenset[str] = frozenset()) -> list[str]:
    """The files added or changed between two snapshots, as sorted "added: x" / "changed: x"
    lines. Changes to ``tracked`` files (git's) are left out: during a run those are a
    person editing, while a test's writes land in new or untracked files (a ledger)."""
    added = sorted(f"added: {p}" for p in after.keys() - before.keys())
    changed = sorted(f"changed: {p}" for p in after.keys() & before.keys() if after[p] != before[p] and p not in tracked)
    return added + changed


def tracked_files(root: Path = REPO) -> frozenset[str]:
    """The files git tracks under ``root`` (empty when it is not a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(name for name in out.decode(errors="replace").split("\0") if name)


_SNAPSHOT_KEY = pytest.StashKey[dict[str, tuple[int, int]]]()
_TRACKED_KEY = pytest.StashKey[frozenset[str]]()
_HYPOTHESIS_HOME_KEY = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    # Hypothesis keeps its example database in ./.hypothesis by default: a temp dir instead
    # (unless the person running the tests chose a place).
    if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        from hypothesis.configuration import set_hypothesis_home_dir

        home = Path(tempfile.mkdtemp(prefix="asgi-llm-hypothesis-"))
        set_hypothesis_home_dir(home)
        config.stash[_HYPOTHESIS_HOME_KEY] = home


def pytest_unconfigure(config: pytest.Config) -> None:
    home = config.stash.get(_HYPOTHESIS_HOME_KEY, None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_SNAPSHOT_KEY] = checkout_snapshot()
    session.config.stash[_TRACKED_KEY] = tracked_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_SNAPSHOT_KEY, None)
    if before is None:
        return
    changes = checkout_changes(before, checkout_snapshot(), session.config.stash.get(_TRACKED_KEY, frozenset()))
    if not changes:
        return
    shown = changes[:20] + ([f"... and {len(changes) - 20} more"] if len(changes) > 20 else [])
    message = (f"files appeared or changed in the checkout {REPO} during the test session (tests must write only "
               "to tmp dirs: give recipes a stores.ledger under tmp_path):\n  " + "\n  ".join(shown))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("=", "files written into the checkout", red=True)
        reporter.write_line(message)
    else:  # pragma: no cover - without the terminal plugin
        print(message)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh real PostgreSQL database for this test session."""
    from tests.services import postgres_database

    yield from postgres_database()


@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.sqlite), pytest.param("postgresql", marks=pytest.mark.postgres)])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each SQL contract test runs on SQLite (a temp file) and on real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("postgres_url")
    # Each test gets a clean schema: drop everything the previous test created.
    import sqlalchemy as sa

    from asgi_llm.stores.sql import normalize_sql_url

    engine = sa.create_engine(normalize_sql_url(url))
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return url
