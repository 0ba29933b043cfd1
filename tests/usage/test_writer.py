"""BatchWriter: batching, retries, spilling when full, replay, shutdown flush."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from asgi_llm.stores import StoreError
from asgi_llm.usage.writer import BatchWriter

pytestmark = pytest.mark.anyio


class Sink:
    """An in-memory sink that can be made to fail; idempotent like the real stores."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.batches: list[int] = []
        self.down = False
        self.calls = 0

    async def __call__(self, batch: list[str]) -> None:
        self.calls += 1
        await anyio.sleep(0)
        if self.down:
            raise StoreError("store down")
        self.batches.append(len(batch))
        for r in batch:
            self.rows[r] = self.rows.get(r, 0) + 1


def make(sink: Sink, tmp_path: Path, **kw: object) -> BatchWriter[str]:
    opts: dict[str, object] = dict(queue_max=1000, batch_size=100, flush_interval_s=0.02, retry_initial_s=0.01,
                                   retry_max_s=0.05, shutdown_timeout_s=2)
    opts.update(kw)
    return BatchWriter("t", sink=sink, encode=lambda s: f'"{s}"', decode=lambda line: line.strip('"'),
                       spill_dir=tmp_path / "spill", **opts)  # type: ignore[arg-type]


async def wait_for(cond, timeout: float = 5) -> None:  # type: ignore[no-untyped-def]
    with anyio.fail_after(timeout):
        while not cond():
            await anyio.sleep(0.01)


class TestBatchWriter:
    async def test_batches_and_flushes(self, tmp_path: Path) -> None:
        """Rows are written in batches of at most batch_size, each exactly once."""
        sink = Sink()
        w = make(sink, tmp_path)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(250):
                w.put(f"r{i}")
            await wait_for(lambda: len(sink.rows) == 250)
            await w.aclose()
        assert max(sink.batches) <= 100 and set(sink.rows.values()) == {1}

    async def test_steady_traffic_is_written_once_per_interval_not_as_it_trickles_in(self, tmp_path: Path) -> None:
        """Rows arriving while a batch is written wait for the next flush: a slow store under
        steady traffic gets about one commit per flush interval, not a stream of tiny ones."""

        class SlowSink(Sink):
            async def __call__(self, batch: list[str]) -> None:
                await anyio.sleep(0.01)  # a commit takes time; rows keep arriving meanwhile
                await super().__call__(batch)

        sink = SlowSink()
        w = make(sink, tmp_path, flush_interval_s=0.1, batch_size=10_000)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(500):  # ~0.5 s of one row per millisecond
                w.put(f"r{i}")
                await anyio.sleep(0.001)
            await wait_for(lambda: len(sink.rows) == 500)
            await w.aclose()
        assert set(sink.rows.values()) == {1}
        # ~0.5-0.8 s of traffic at one flush per 0.1 s: a handful of batches (it was one per
        # ~10 ms write, i.e. dozens, when the loop drained the queue until it was empty).
        assert len(sink.batches) <= 15, sink.batches

    async def test_outage_is_retried(self, tmp_path: Path) -> None:
        """While the store is down rows wait; when it is back every row is written."""
        sink = Sink()
        sink.down = True
        w = make(sink, tmp_path)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(50):
                w.put(f"r{i}")
            # Wait for what is asserted: the writer counts a failure after the store call returns.
            await wait_for(lambda: w.stats["failures"] >= 3)
            assert not sink.rows
            sink.down = False
            await wait_for(lambda: len(sink.rows) == 50)
            await w.aclose()
        assert w.stats["written"] == 50

    async def test_full_queue_spills_then_replays(self, tmp_path: Path) -> None:
        """Past queue_max rows go to a spill file (never dropped), replayed once the store is back."""
        sink = Sink()
        sink.down = True
        w = make(sink, tmp_path, queue_max=20, batch_size=10)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(100):
                w.put(f"r{i}")
            assert w.backlog <= 20 and w.stats["spilled"] >= 70
            assert list((tmp_path / "spill").glob("t-*.jsonl"))
            sink.down = False
            await wait_for(lambda: len(sink.rows) == 100)
            await w.aclose()
        assert sorted(sink.rows) == sorted(f"r{i}" for i in range(100))
        assert not list((tmp_path / "spill").iterdir())

    async def test_shutdown_during_outage_spills_and_next_start_replays(self, tmp_path: Path) -> None:
        """Rows not written by shutdown are spilled; the next writer replays them at start."""
        sink = Sink()
        sink.down = True
        w = make(sink, tmp_path, shutdown_timeout_s=0.2)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(30):
                w.put(f"r{i}")
            await w.aclose()
        assert w.stats["spilled"] == 30 and not sink.rows
        sink.down = False
        w2 = make(sink, tmp_path)
        async with anyio.create_task_group() as tg:
            await w2.start(tg)
            await wait_for(lambda: len(sink.rows) == 30)
            await w2.aclose()
        assert w2.stats["replayed"] == 30

    async def test_put_never_blocks(self, tmp_path: Path) -> None:
        """put() is synchronous and returns immediately even with no flush loop running."""
        sink = Sink()
        w = make(sink, tmp_path, queue_max=5)
        for i in range(10):
            w.put(f"r{i}")
        assert w.backlog == 5 and w.stats["spilled"] == 5
        await w.aclose()  # never started: everything left is spilled, nothing lost
        assert w.stats["spilled"] == 10

    async def test_shutdown_flushes_queue(self, tmp_path: Path) -> None:
        """aclose() writes what is queued before returning."""
        sink = Sink()
        w = make(sink, tmp_path, flush_interval_s=60)
        async with anyio.create_task_group() as tg:
            await w.start(tg)
            for i in range(42):
                w.put(f"r{i}")
            await w.aclose()
        assert len(sink.rows) == 42 and w.stats["spilled"] == 0
