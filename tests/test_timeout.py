"""fail_after(): asyncio.timeout's semantics on one shared timer per loop (anyio's on trio)."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest

from asgi_llm import _timeout
from asgi_llm._timeout import TimeoutPerWait, fail_after

asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@pytest.mark.anyio
async def test_a_block_that_overruns_raises_timeout_error() -> None:
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError):
        async with fail_after(0.05):
            await anyio.sleep(5)
    elapsed = time.perf_counter() - t0
    assert 0.05 <= elapsed < 2.0  # fired (never early), not after the 5 s sleep


@pytest.mark.anyio
async def test_a_block_that_finishes_in_time_is_untouched() -> None:
    async with fail_after(1.0):
        await anyio.sleep(0)
    await anyio.sleep(0.05)  # the timeout left nothing behind that could still fire


@pytest.mark.anyio
@asyncio_only
async def test_many_timeouts_share_one_loop_timer() -> None:
    loop = asyncio.get_running_loop()
    async with fail_after(30):
        pass
    deadlines = _timeout._current
    assert deadlines is not None and deadlines.loop_ref() is loop
    handle = deadlines._handle
    assert handle is not None
    for _ in range(200):
        async with fail_after(30):
            await asyncio.sleep(0)
    assert deadlines._handle is handle  # later deadlines never re-arm the timer
    assert not deadlines._active


@pytest.mark.anyio
@asyncio_only
async def test_an_earlier_deadline_re_arms_the_timer() -> None:
    async with fail_after(60):
        with pytest.raises(TimeoutError):
            async with fail_after(0.03):
                await asyncio.sleep(5)


@pytest.mark.anyio
@asyncio_only
async def test_the_inner_timeout_fires_and_the_outer_one_does_not() -> None:
    async with fail_after(5):
        with pytest.raises(TimeoutError):
            async with fail_after(0.02):
                await asyncio.sleep(1)
        await asyncio.sleep(0.05)  # still inside the outer block: it was not cancelled


@pytest.mark.anyio
@asyncio_only
async def test_an_outside_cancel_is_not_turned_into_a_timeout() -> None:
    async def victim() -> None:
        async with fail_after(0):
            await asyncio.sleep(1)

    task = asyncio.create_task(victim())
    await asyncio.sleep(0)  # the victim is inside its block, its deadline already due
    task.cancel()  # somebody cancels the task, and in the same loop step ...
    _timeout._current._fire()  # type: ignore[union-attr]  # ... the deadline expires too
    with pytest.raises(asyncio.CancelledError):  # the outside cancel wins
        await task


@pytest.mark.anyio
@asyncio_only
async def test_a_timeout_in_one_task_does_not_touch_another() -> None:
    async def slow() -> str:
        try:
            async with fail_after(0.02):
                await asyncio.sleep(1)
        except TimeoutError:
            return "timed out"
        return "finished"

    async def fast() -> str:
        async with fail_after(1):
            await asyncio.sleep(0.1)
        return "finished"

    assert await asyncio.gather(slow(), fast()) == ["timed out", "finished"]



@pytest.mark.anyio
async def test_timeout_per_wait_times_out_a_later_wait() -> None:
    waits = TimeoutPerWait()
    for _ in range(5):
        async with waits(1.0):
            await anyio.sleep(0)
    with pytest.raises(TimeoutError):
        async with waits(0.02):
            await anyio.sleep(5)
    async with waits(1.0):  # usable again after a timeout
        await anyio.sleep(0.03)
