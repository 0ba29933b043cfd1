"""The state store contract, on memory (asyncio and trio) and on real Redis (asyncio only:
redis.asyncio does not run under trio).

Time: the memory store runs on a fake clock; Redis keeps its own (``TIME``), so the
Redis runs use short windows and real sleeps.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
import pytest

from asgi_llm.stores import StoreError
from asgi_llm.stores.state import Admission, Limit, MemoryStateStore, RedisStateStore, StateStore, state_store_from_url

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=[
        pytest.param(("memory", "asyncio"), marks=pytest.mark.memory),
        pytest.param(("memory", "trio"), marks=pytest.mark.memory),
        pytest.param(("redis", "asyncio"), marks=pytest.mark.redis),
    ],
    ids=["memory-asyncio", "memory-trio", "redis-asyncio"],
)
def backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def anyio_backend(backend: tuple[str, str]) -> str:
    """Overrides the suite's: Redis runs under asyncio only."""
    return backend[1]


@dataclass
class Subject:
    store: StateStore
    advance: Callable[[float], Awaitable[None]]
    ns: str  # a per-test namespace for scopes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.25

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def subject(backend: tuple[str, str]) -> AsyncIterator[Subject]:
    ns = uuid.uuid4().hex[:8]
    if backend[0] == "memory":
        clock = FakeClock()

        async def advance(s: float) -> None:
            clock.now += s

        yield Subject(MemoryStateStore(clock=clock), advance, ns)
        return
    from tests.services import REDIS_HOST, REDIS_PORT, require_service

    # No FLUSHDB: a per-test prefix isolates this test even from a suite running side by side; keys expire.
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    store = RedisStateStore(f"redis://{REDIS_HOST}:{REDIS_PORT}/15", prefix=f"test:{ns}:")
    try:
        yield Subject(store, anyio.sleep, ns)
    finally:
        await store.aclose()


async def reserve(s: Subject, *limits: Limit, lease_s: float = 60) -> Admission:
    return await s.store.reserve(list(limits), reservation_id=uuid.uuid4().hex, lease_s=lease_s)


class TestAdmission:
    async def test_admits_up_to_the_limit(self, subject: Subject) -> None:
        """Exactly `limit` requests fit; the next is refused, naming the limit, with a retry time."""
        lim = Limit("requests", f"key:{subject.ns}", 3, 1, "key 'k'")
        results = [await reserve(subject, lim) for _ in range(4)]
        assert [r.admitted for r in results] == [True, True, True, False]
        assert [r.statuses[0].remaining for r in results[:3]] == [2, 1, 0]
        denied = results[3]
        assert denied.denied is not None and denied.denied.limit == lim and denied.denied.used == 3
        assert 0 < denied.retry_after_s <= 120

    async def test_many_concurrent_reservations_never_over_admit(self, subject: Subject) -> None:
        """200 concurrent reservations against rpm 50, tpm and concurrency: exactly 50 admitted."""
        limits = [
            Limit("requests", f"k:{subject.ns}", 50, 1),
            Limit("tokens", f"k:{subject.ns}", 10_000, 10),
            Limit("concurrency", f"k:{subject.ns}", 1000, 1),
        ]
        admitted = 0

        async def one() -> None:
            nonlocal admitted
            if (await reserve(subject, *limits)).admitted:
                admitted += 1

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(one)
        assert admitted == 50

    async def test_all_or_nothing(self, subject: Subject) -> None:
        """When one limit is full, the others are not charged either."""
        ok = Limit("requests", f"a:{subject.ns}", 10, 1)
        full = Limit("tokens", f"b:{subject.ns}", 100, 100)
        assert (await reserve(subject, full)).admitted
        refused = await reserve(subject, ok, full)
        assert not refused.admitted and refused.denied is not None and refused.denied.limit == full
        after = await reserve(subject, ok)
        assert after.statuses[0].used == 0  # the refused admission charged nothing

    async def test_request_larger_than_the_limit_is_refused(self, subject: Subject) -> None:
        """A single request above a token limit can never fit and is refused at once."""
        lim = Limit("tokens", f"k:{subject.ns}", 100, 101)
        adm = await reserve(subject, lim)
        assert not adm.admitted and adm.retry_after_s > 0


class TestSettlement:
    async def test_refund_restores_capacity(self, subject: Subject) -> None:
        """Settling with less than reserved gives the difference back at once."""
        lim = Limit("tokens", f"k:{subject.ns}", 150, 100)
        first = await reserve(subject, lim)
        assert first.admitted and not (await reserve(subject, lim)).admitted
        await subject.store.settle(first.reservation, tokens=20, spend=0)
        second = await reserve(subject, lim)
        assert second.admitted and second.statuses[0].used == 20

    async def test_underestimate_is_charged(self, subject: Subject) -> None:
        """Settling with more than reserved charges the excess."""
        lim = Limit("tokens", f"k:{subject.ns}", 1000, 100)
        adm = await reserve(subject, lim)
        await subject.store.settle(adm.reservation, tokens=300, spend=0)
        assert (await reserve(subject, Limit("tokens", f"k:{subject.ns}", 1000, 0))).statuses[0].used == 300

    async def test_spend_is_reserved_and_refunded(self, subject: Subject) -> None:
        """Day and month budgets (micro-USD) reserve the estimate and keep only the real cost."""
        day = Limit("spend_day", f"o:{subject.ns}", 5_000, 3_000)
        month = Limit("spend_month", f"o:{subject.ns}", 100_000, 3_000)
        a = await reserve(subject, day, month)
        assert a.admitted and not (await reserve(subject, day, month)).admitted
        await subject.store.settle(a.reservation, tokens=0, spend=1_000)
        b = await reserve(subject, day, month)
        assert b.admitted
        assert [s.used for s in b.statuses] == [1_000, 1_000]
        assert 0 < b.statuses[0].reset_s <= 86_400 and 0 < b.statuses[1].reset_s <= 31 * 86_400

    async def test_spend_refusal_waits_for_the_next_period(self, subject: Subject) -> None:
        """A spent daily budget says to retry when the UTC day ends."""
        day = Limit("spend_day", f"o:{subject.ns}", 1_000, 1_000)
        assert (await reserve(subject, day)).admitted
        refused = await reserve(subject, day)
        assert not refused.admitted
        assert abs(refused.retry_after_s - refused.statuses[0].reset_s) < 1
        assert refused.retry_after_s <= 86_400

    async def test_concurrency_slot_released_on_settle(self, subject: Subject) -> None:
        """A concurrency slot is held until settlement, then free again."""
        lim = Limit("concurrency", f"k:{subject.ns}", 1, 1)
        held = await reserve(subject, lim)
        assert held.admitted and not (await reserve(subject, lim)).admitted
        await subject.store.settle(held.reservation, tokens=0, spend=0)
        assert (await reserve(subject, lim)).admitted


class TestLimit:
    def test_window_ms_is_derived(self) -> None:
        """window_ms follows window_s (at least 1 ms) and takes no part in equality or repr."""
        assert Limit("requests", "k", 1, 1).window_ms == 60_000
        assert Limit("requests", "k", 1, 1, window_s=0.0001).window_ms == 1
        assert Limit("requests", "k", 1, 1, window_s=2.5) == Limit("requests", "k", 1, 1, window_s=2.5)
        assert "window_ms" not in repr(Limit("requests", "k", 1, 1))


class TestExpiry:
    async def test_window_slides(self, subject: Subject) -> None:
        """A full window frees up gradually as it slides, and fully after two windows."""
        lim = Limit("requests", f"k:{subject.ns}", 4, 1, window_s=1.0)
        for _ in range(4):
            assert (await reserve(subject, lim)).admitted
        refused = await reserve(subject, lim)
        assert not refused.admitted and refused.retry_after_s <= 2.0
        await subject.advance(2.05)
        assert all([(await reserve(subject, lim)).admitted for _ in range(4)])

    async def test_previous_window_still_weighs(self, subject: Subject) -> None:
        """Just after a window ends, the previous window's count still weighs almost fully."""
        lim = Limit("requests", f"k:{subject.ns}", 10, 1, window_s=3.0)
        for _ in range(10):
            assert (await reserve(subject, lim)).admitted
        # Move to the beginning of the next window (Redis: wait for it on the server's clock).
        if isinstance(subject.store, MemoryStateStore):
            await subject.advance(3.0 - (subject.store._clock() % 3.0) + 0.05)
        else:
            await anyio.sleep(3.0 - (time.time() % 3.0) + 0.05)
        admitted = sum([(await reserve(subject, lim)).admitted for _ in range(10)])
        assert admitted <= 2

    async def test_concurrency_lease_expires(self, subject: Subject) -> None:
        """A slot whose holder never settles (a crashed replica) frees when its lease expires."""
        lim = Limit("concurrency", f"k:{subject.ns}", 1, 1)
        assert (await reserve(subject, lim, lease_s=0.3)).admitted
        assert not (await reserve(subject, lim, lease_s=0.3)).admitted
        await subject.advance(0.4)
        assert (await reserve(subject, lim)).admitted


class TestFailures:
    @pytest.mark.parametrize("backend", [pytest.param(("redis", "asyncio"), marks=pytest.mark.redis)], ids=["redis-asyncio"])
    async def test_unreachable_redis_is_a_store_error_quickly(self, backend: tuple[str, str]) -> None:
        """Nothing listening: StoreError within the timeout; ping reports it; never a driver exception."""
        from asgi_llm.testing.processes import free_port

        store = RedisStateStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreError) as exc:
                await store.reserve([Limit("requests", "k", 1, 1)], reservation_id="r")
            assert time.monotonic() - t0 < 2
            assert exc.value.__cause__ is not None and exc.value.status_code == 503
            assert "unreachable" in (await store.ping() or "")
        finally:
            await store.aclose()

    def test_store_from_url(self) -> None:
        """memory:// and redis:// pick their store; other schemes are refused."""
        assert isinstance(state_store_from_url("memory://"), MemoryStateStore)
        assert isinstance(state_store_from_url("redis://127.0.0.1:6379/0"), RedisStateStore)
        with pytest.raises(ValueError, match="unsupported"):
            state_store_from_url("mongodb://x")


class TestResetAgreesWithTheWindow:
    """Issue 16 item 7: ``x-ratelimit-reset-*`` said ``0s`` right after a request, later more
    than 60 s for a per-minute limit, and disagreed with ``Retry-After``."""

    async def test_reset_counts_this_request_and_stays_within_the_window(self, subject: Subject) -> None:
        lim = Limit("requests", f"rw:{subject.ns}", 5, 1, "key 'k'")
        for step in range(4):
            adm = await reserve(subject, lim)
            assert adm.admitted
            s = adm.statuses[0]
            assert s.remaining == 4 - step
            assert 0 < s.reset_s <= 60, s  # never "0s" once counted, never past a per-minute window
            if step == 1:
                await subject.advance(1)
        assert (await reserve(subject, lim)).statuses[0].remaining == 0

    async def test_exhausted_reset_is_the_retry_after(self, subject: Subject) -> None:
        lim = Limit("requests", f"rx:{subject.ns}", 2, 1, "key 'k'")
        assert (await reserve(subject, lim)).admitted
        last = await reserve(subject, lim)
        assert last.admitted and last.statuses[0].remaining == 0
        refused = await reserve(subject, lim)
        assert not refused.admitted
        assert refused.denied is not None and refused.denied.reset_s == refused.retry_after_s
        assert refused.statuses[0].reset_s == refused.retry_after_s
        # The last admitted request already said when the next one would fit.
        assert abs(last.statuses[0].reset_s - refused.retry_after_s) < 1
