"""BatchWriter journal: a process crash (SIGKILL) loses no row it was given.

A real child process puts rows into a writer whose store never answers, and is
SIGKILLed; a writer started afterwards on the same spill dir replays every row. A live
writer's journal is never claimed by another writer sharing its spill dir.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from tests.usage.test_writer import Sink, make, wait_for

pytestmark = pytest.mark.anyio

CHILD = textwrap.dedent("""\
    import sys, anyio
    from asgi_llm.usage.writer import BatchWriter

    async def sink(batch):
        await anyio.sleep_forever()  # the store never answers: every row stays in memory

    async def main():
        w = BatchWriter("t", sink=sink, encode=lambda s: f'"{s}"', decode=lambda line: line.strip('"'),
                        spill_dir=sys.argv[1], flush_interval_s=0.05)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(int(sys.argv[2])):
                w.put(f"r{i}")
            print("ready", flush=True)
            await anyio.sleep_forever()

    anyio.run(main)
    """)


def _run_child_and_kill(spill: Path, n: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(spill), str(n)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded: the child prints once, or exits (EOF)
        assert line.strip() == b"ready", line
        time.sleep(0.1)  # let it seal a segment or two: the replay must cover sealed and open ones
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


class TestJournal:
    async def test_rows_of_a_sigkilled_process_are_replayed(self, tmp_path: Path) -> None:
        """SIGKILL with 500 rows in memory: the next writer on the spill dir writes all 500."""
        spill = tmp_path / "spill"
        await anyio.to_thread.run_sync(_run_child_and_kill, spill, 500)
        assert list(spill.glob("journal-t-*.jsonl")), "the dead process left its journal"
        sink = Sink()
        w = make(sink, tmp_path)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            await wait_for(lambda: len(sink.rows) == 500)
            await w.aclose()
        assert set(sink.rows) == {f"r{i}" for i in range(500)}
        assert not list(spill.iterdir()), "replayed journals and spills are deleted"

    async def test_a_live_writers_journal_is_not_claimed(self, tmp_path: Path) -> None:
        """Two writers share a spill dir (replicas on one machine): each writes only its own
        rows; neither replays the other's journal while it lives."""
        stuck, other = Sink(), Sink()
        stuck.down = True
        a, b = make(stuck, tmp_path, retry_max_s=0.02), make(other, tmp_path)
        async with anyio.create_task_group() as tg:
            await a.start(tg)
            await b.start(tg)
            for i in range(20):
                a.put(f"a{i}")
            await wait_for(lambda: stuck.calls >= 5)  # a's loop ran, sealed and keeps retrying
            b.put("b0")
            await wait_for(lambda: "b0" in other.rows)
            for _ in range(5):  # several of b's loop passes (each looks for dead journals)
                await b.flush()
                await anyio.sleep(0.03)
            assert set(other.rows) == {"b0"}
            stuck.down = False
            await wait_for(lambda: len(stuck.rows) == 20)
            await a.aclose()
            await b.aclose()
        assert not list((tmp_path / "spill").glob("journal-*"))

    async def test_journal_disabled_writes_no_file(self, tmp_path: Path) -> None:
        """``journal=False``: nothing on disk while the store answers."""
        sink = Sink()
        w = make(sink, tmp_path, journal=False, flush_interval_s=60)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            w.put("r0")
            assert not (tmp_path / "spill").exists()
            await w.aclose()
        assert sink.rows == {"r0": 1}
