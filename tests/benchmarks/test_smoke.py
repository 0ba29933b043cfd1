"""Smoke run of the benchmark harness: it runs and it produces its tables.

Never a timed assertion: numbers on a shared CI machine mean nothing; only the shape
of the output is checked.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROWS = ["direct", "passthrough", "full"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.e2e
class TestHarnessSmoke:
    def test_run_produces_a_table_with_every_row(self, tmp_path: Path) -> None:
        """`run --quick` writes Markdown + JSON with a numeric requests/s for each requested row."""
        proc = _run("run", "--quick", "--duration", "1", "--warmup", "0", "--reps", "1", "--concurrency", "1",
                    "--no-stream", "--rows", ",".join(ROWS), "--out", str(tmp_path))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        md = (tmp_path / "latest.md").read_text()
        for row in ROWS:
            assert re.search(rf"^\| {row} \| 1 \| \d+ \(", md, re.MULTILINE), f"no numeric row for {row}:\n{md}"
        assert "layers present" in md and "commit" in md and "python -m benchmarks run" in md
        data = json.loads((tmp_path / "latest.json").read_text())
        assert {r["row"] for r in data["results"]} == set(ROWS)
        assert all(r["errors"] == 0 for r in data["results"]), data["results"]

    def test_layers_produces_its_table(self, tmp_path: Path) -> None:
        """`layers --quick` reports one line per stack, innermost first, every response a 200."""
        proc = _run("layers", "--quick", "--requests", "200", "--out", str(tmp_path))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        md = (tmp_path / "layers-latest.md").read_text()
        assert "| floor (raw ASGI app) |" in md and "| dispatch | dispatch |" in md
        data = json.loads((tmp_path / "layers-latest.json").read_text())
        for rows in data["result"]["modes"].values():
            assert all(r["status"] == 200 for r in rows), rows

    def test_growth_node_rows(self) -> None:
        """The growth benchmark's node case: 10 nodes enrolled and online, served with no
        errors, and a "1 model × 10 nodes" line in the recipe table."""
        from benchmarks.memory import growth_markdown, measure_growth

        res = measure_growth(cases=["1 model × 10 nodes"], prompt_sizes=(), duration=1, warmup=0,
                             log=lambda *_: None)
        (row,) = res["recipe"]
        assert row["errors"] == 0 and row["rps"] > 0, row
        assert row["nodes"]["count"] == 10 and row["nodes"]["heartbeat_failures"] == 0, row["nodes"]
        assert re.search(r"^\| 1 model × 10 nodes \| \d+ \|", growth_markdown(res), re.MULTILINE)


class TestBaselineRows:
    """``<row>@<ref>``: the same row from an earlier commit, for before/after in one run."""

    def test_baseline_rows_are_named_after_their_base_row(self) -> None:
        from benchmarks.servers import row_info, split_row

        assert split_row("full@abc123") == ("full", "abc123")
        assert split_row("full") == ("full", None)
        assert "abc123" in row_info("full@abc123").title
        for bad in ("passthrough@abc123", "nosuchrow", "nosuchrow@abc123"):
            with pytest.raises(KeyError):
                row_info(bad)

    def test_checkout_extracts_the_package_of_a_commit(self, tmp_path: Path) -> None:
        from benchmarks.servers import Skip, checkout_package

        repo = _git_repo_with_package(tmp_path / "repo")
        with pytest.raises(Skip, match="cannot check out"):
            checkout_package("no-such-ref-0123", tmp_path / "out", repo=repo)
        dest = checkout_package("HEAD", tmp_path / "out", repo=repo)
        assert (dest / "asgi_llm" / "__init__.py").read_text() == "MARK = 'baseline'\n"
        assert not (dest / "benchmarks").exists()  # only the package: the harness stays this tree's

def _git_repo_with_package(path: Path) -> Path:
    """A throwaway git repository with one commit of an ``asgi_llm`` package (and a
    ``benchmarks`` folder that must not be extracted): the tests do not depend on the
    history of the checkout they run in."""
    (path / "asgi_llm").mkdir(parents=True)
    (path / "asgi_llm" / "__init__.py").write_text("MARK = 'baseline'\n")
    (path / "benchmarks").mkdir()
    (path / "benchmarks" / "x.py").write_text("")
    git = ["git", "-C", str(path), "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "baseline"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    return path


def test_a_baseline_row_imports_the_package_of_its_commit(tmp_path: Path) -> None:
    """`python -m` puts the working directory first on sys.path: without PYTHONSAFEPATH a
    baseline row would silently serve this tree's package (it did, once)."""
    import os

    from benchmarks.servers import Skip, _check_imports_from, checkout_package

    dest = checkout_package("HEAD", tmp_path / "out", repo=_git_repo_with_package(tmp_path / "repo"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(dest), str(REPO)])}
    with pytest.raises(Skip, match="would not be the one imported"):
        _check_imports_from(dest, {k: v for k, v in env.items() if k != "PYTHONSAFEPATH"})
    _check_imports_from(dest, {**env, "PYTHONSAFEPATH": "1"})
