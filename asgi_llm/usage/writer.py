"""BatchWriter: rows off the hot path, in batches, never lost.

``put(row)`` is synchronous and never blocks or awaits: it appends to an in-memory
queue. A flush loop in the gateway's task group writes the queue in batches (every
``flush_interval_s``, or as soon as ``batch_size`` rows wait).

Limits and what happens when they are hit:

* **queue full** (``queue_max`` rows waiting, e.g. the store has been down for a while):
  further rows are appended to a *spill file* (JSON lines) under ``spill_dir`` instead —
  the response is never blocked and no row is dropped. Memory stays bounded.
* **every row is normalised** (``normalise``, e.g. :func:`asgi_llm.usage.records.bounded`)
  when it is queued and when it is replayed: its values fit their columns before the
  database sees them.
* **store outage** (the store unreachable: a connection, timeout or lock error): the
  batch is kept and retried with jittered exponential backoff (``retry_initial_s``
  doubling to ``retry_max_s``); rows keep queueing (then spilling) meanwhile. Nothing is
  lost, nothing is set aside.
* **data error** (the store is up but refuses the batch: ``DataError``,
  ``IntegrityError``, a value the driver cannot convert — ``ValueError``,
  ``OverflowError``, ``TypeError``…): the batch is **bisected** — halves are written on
  their own, recursively — so the good rows are written and each refused row is
  **quarantined** (``quarantine(entry)``: a SQL table; a JSON-lines file
  ``quarantine-<name>-….jsonl`` in the spill dir if even that fails), never retried
  forever and never blocking the rows behind it. ``substitute(row, error)`` may give a
  row to write in its place (the audit chain's placeholder). An error that is neither is
  retried a few times (``unknown_retries``), then handled as a data error.
* **recovery**: once the queue is drained, spill files are claimed (renamed) and
  replayed in batches, then deleted. At start, spill files left by a previous process
  (a crash, a shutdown during an outage) are replayed the same way.
  A spilled row is normalised, bisected and quarantined like a live one, and a line that
  cannot be read is quarantined, not skipped.
* **shutdown** (:meth:`aclose`): the queue is flushed for up to ``shutdown_timeout_s``;
  whatever could not be written by then is spilled, to be replayed on the next start.
* **a bounded flush** (:meth:`flush` with ``timeout_s``) that runs out of time puts the
  rows it had taken back at the head of the queue: a cancelled write loses nothing.

Replays and retries can repeat a row (a batch whose commit succeeded but whose
acknowledgement was lost); sinks must be idempotent (the ledger inserts with
``ON CONFLICT DO NOTHING`` on ``attempt_id``, the audit log skips known ``event_id`` s).

* **journal** (``journal=True``, POSIX): :meth:`put` also appends the row's line to a
  per-process journal file ``journal-<name>-<pid>-….jsonl`` in ``spill_dir`` — one
  ``write()`` to the kernel, no ``fsync`` — before it returns, so a *process* crash
  (SIGKILL, OOM kill) loses no row it had been given: the kernel still writes the file.
  The journal is a sequence of segments: each flush seals the current one (``fsync`` in a
  worker thread, off the event loop) and deletes the sealed segments once their rows are
  written. The process holds an exclusive ``flock`` on its open segment; a segment
  nobody holds a lock on belongs to a dead process and is claimed (renamed to a spill
  file) and replayed — at start and on every flush, by whichever process sharing the
  ``spill_dir`` sees it first. Only a *machine* crash can lose rows: those put since
  the last flush (``flush_interval_s``), whose segment was not yet ``fsync``-ed.
  A journal row already written before the crash is written again: sinks are idempotent.

Without the journal, a process killed without shutdown (SIGKILL, power loss) loses the
rows that were still in memory — at most ``flush_interval_s`` worth of traffic plus a batch.
"""

from __future__ import annotations

import contextlib
import json
import sys
import logging
import os
import random
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from asgi_llm.usage.failures import PAYLOAD_MAX, QuarantineEntry, error_text, failure_kind

__all__ = ["BatchWriter"]

T = TypeVar("T")
log = logging.getLogger("asgi_llm.usage.writer")

class BatchWriter(Generic[T]):
    """A bounded, batching, retrying, spilling writer (a gateway ``Resource``).

    Args:
        name: names the spill files (``ledger``, ``audit``) and the log lines.
        sink: ``await sink(batch)`` writes one batch; raises to have it retried (an
            outage) or bisected (a data error, see :func:`failure_kind`).
        encode/decode: one item ↔ one line of JSON (for the spill and quarantine files).
        spill_dir: where spill files live; created when first needed.
        normalise: makes an item storable (in place or a new one); applied by
            :meth:`put` and to replayed items.
        quarantine: ``await quarantine(entry)`` keeps a refused item (else, or when it
            fails, a ``quarantine-<name>-….jsonl`` file in ``spill_dir``).
        substitute: ``substitute(item, error)`` → an item to write in a quarantined
            one's place, or ``None``.
        journal: append each queued item to a per-process journal in ``spill_dir``
            (POSIX), replayed after a crash (see the module docstring).

    Example:
        >>> writer = BatchWriter("ledger", sink=store.insert_many, encode=LedgerRow.to_json,
        ...                      decode=LedgerRow.from_json, spill_dir=Path("/var/lib/asgi-llm/spill"))
        >>> await writer.start(task_group)
        >>> writer.put(row)          # sync, never blocks
        >>> await writer.aclose()    # flushes
    """

    def __init__(
        self,
        name: str,
        *,
        sink: Callable[[list[T]], Awaitable[None]],
        encode: Callable[[T], str],
        decode: Callable[[str], T],
        spill_dir: str | os.PathLike[str],
        queue_max: int = 100_000,
        batch_size: int = 5000,
        flush_interval_s: float = 1.0,
        shutdown_timeout_s: float = 10.0,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 5.0,
        normalise: Callable[[T], T] | None = None,
        quarantine: Callable[[QuarantineEntry], Awaitable[None]] | None = None,
        substitute: Callable[[T, str], T | None] | None = None,
        unknown_retries: int = 3,
        quarantine_timeout_s: float = 10.0,
        journal: bool = True,
    ) -> None:
        self.name = name
        self.sink = sink
        self.encode = encode
        self.decode = decode
        self.spill_dir = Path(spill_dir)
        self.queue_max = queue_max
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.normalise = normalise
        self.quarantine = quarantine
        self.substitute = substitute
        self.unknown_retries = unknown_retries
        self.quarantine_timeout_s = quarantine_timeout_s
        self._queue: deque[T] = deque()
        self._inflight: list[T] = []
        self._wake = anyio.Event()
        # Held while a batch is taken and written, so flush() also waits for the batch
        # the background loop may be writing right now (it left the queue already).
        self._write_lock = anyio.Lock()
        self._stopping = False
        self._closed = False
        self._done: anyio.Event | None = None
        self._scope: anyio.CancelScope | None = None
        self._spill: IO[str] | None = None
        self._spill_path: Path | None = None
        self.journal = journal and _flock is not None
        self._journal: IO[str] | None = None
        self._journal_path: Path | None = None
        self._journal_failed = False
        self._sealed: list[tuple[Path, IO[str]]] = []
        self.stats: dict[str, Any] = {"queued": 0, "written": 0, "batches": 0, "failures": 0, "spilled": 0,
                                      "replayed": 0, "bisections": 0, "quarantined": 0, "quarantined_to_file": 0,
                                      "last_error": None}

    # ------------------------------------------------------------------ hot path
    def put(self, item: T) -> None:
        """Queue one item, normalised. Synchronous; never blocks; spills when the queue is full."""
        self.stats["queued"] += 1
        if self.normalise is not None:
            item = self._normalised(item)
        if self._closed or len(self._queue) >= self.queue_max:
            self._spill_items([item])  # on disk already: not journaled too
            return
        if self.journal:
            self._journal_item(item)
        self._queue.append(item)
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    @property
    def backlog(self) -> int:
        """Items waiting in memory (queue + the batch being written)."""
        return len(self._queue) + len(self._inflight)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, task_group: TaskGroup) -> None:
        """Start the flush loop in the gateway's task group."""
        self._closed = False
        self._stopping = False
        self._done = anyio.Event()
        task_group.start_soon(self._run)

    async def aclose(self) -> None:
        """Flush what is queued (up to ``shutdown_timeout_s``); spill the rest."""
        if self._done is None:
            self._closed = True
            spilled = self._spill_items(list(self._queue))
            self._queue.clear()
            self._close_spill()
            self._end_journal(delete=spilled)
            return
        self._stopping = True
        self._wake.set()
        with anyio.move_on_after(self.shutdown_timeout_s):
            await self._done.wait()
        if not self._done.is_set() and self._scope is not None:
            self._scope.cancel()
            with anyio.move_on_after(5):
                await self._done.wait()
        self._closed = True
        leftover = [*self._inflight, *self._queue]
        self._inflight, self._queue = [], deque()
        spilled = True
        if leftover:
            log.warning("%s writer: %d rows not written at shutdown were spilled to %s", self.name, len(leftover), self.spill_dir)
            spilled = self._spill_items(leftover)
        self._close_spill()
        self._end_journal(delete=spilled)  # every row is written or spilled: the journal is not needed
        self._done = None

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Write everything queued now, including a batch being written (tests, admin).

        With ``timeout_s``, gives up after that long (the store unreachable): the rows
        stay queued, nothing is lost. Returns whether everything was written.
        """
        with anyio.move_on_after(timeout_s) as scope:
            async with self._write_lock:
                await self._write_queued(None)
        return not scope.cancelled_caught

    def _normalised(self, item: T) -> T:
        assert self.normalise is not None
        try:
            return self.normalise(item)
        except Exception:  # noqa: BLE001 - queue it as it is: the database decides, bisection quarantines
            log.exception("%s writer: could not normalise a row; queued as it is", self.name)
            return item

    # ------------------------------------------------------------------ loop
    async def _run(self) -> None:
        assert self._done is not None
        done = self._done
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                await self._guarded(self._replay_spills)
                while True:
                    with anyio.move_on_after(self.flush_interval_s):
                        await self._wake.wait()
                    self._wake = anyio.Event()
                    sealed = await self._seal_journal()
                    # Stopping: everything, so nothing is left to spill.
                    if await self._guarded(self._write_now, None if self._stopping else len(self._queue)):
                        self._drop_segments(sealed)
                    if self._stopping:
                        break
                    await self._guarded(self._replay_spills)
        finally:
            self._scope = None
            if not self._stopping:
                # Cancelled without aclose(): unlock the journal, its rows stay on disk for
                # the next process to replay (it is not ours to delete).
                self._end_journal(delete=False)
            done.set()

    async def _write_now(self, limit: int | None) -> None:
        async with self._write_lock:
            await self._write_queued(limit)

    async def _guarded(self, fn: Callable[..., Awaitable[None]], *args: Any) -> bool:
        """Run one step of the loop; an unexpected error is logged and the loop goes on
        (a loop that died would leave every later row to the shutdown spill).
        Returns whether the step completed."""
        try:
            await fn(*args)
        except Exception:  # noqa: BLE001 - the loop must never stop
            log.exception("%s writer: unexpected error; the writer carries on", self.name)
            await anyio.sleep(self.retry_max_s)
            return False
        return True

    async def _write_queued(self, limit: int | None) -> None:
        """Write the first ``limit`` queued rows in batches (``None``: until the queue is
        empty, rows that arrive meanwhile included).

        A flush passes what had queued when it started: rows that arrive during its
        writes wait for the next flush. Draining until empty would, under steady traffic,
        commit a few rows at a time back to back (measured: ~190 commits/s of ~6 rows
        each per writer), and per-commit costs would dominate.
        """
        while self._queue and (limit is None or limit > 0):
            batch = self._take(limit)
            if limit is not None:
                limit -= len(batch)
            await self._write(batch)

    def _take(self, limit: int | None = None) -> list[T]:
        n = min(self.batch_size, len(self._queue))
        if limit is not None:
            n = min(n, limit)
        batch = [self._queue.popleft() for _ in range(n)]
        self._inflight = batch
        return batch

    async def _write(self, batch: list[T], *, requeue: bool = True) -> None:
        """Write one batch: retried while the store is out, bisected on a data error.

        Ranges of the batch are written left to right (a stack of ``(lo, hi)``), so the
        rows not yet written are always ``batch[done:]``: that is ``_inflight`` (spilled
        at shutdown), and what goes back to the head of the queue if this is cancelled
        (``requeue``; a replayed batch is still in its spill file instead).
        """
        n = len(batch)
        if requeue:
            self._inflight = batch
        pending = [(0, n)]
        substituted: set[int] = set()
        delay = self.retry_initial_s
        unknown = 0
        done = 0
        try:
            while pending:
                lo, hi = pending[-1]
                try:
                    await self.sink(batch if (lo == 0 and hi == n) else batch[lo:hi])
                except Exception as exc:  # noqa: BLE001 - classified; the loop must survive anything
                    kind = failure_kind(exc)
                    self.stats["last_error"] = error_text(exc)[:300]  # no lone surrogate reaches a JSON answer
                    if kind == "outage" or (kind == "unknown" and unknown < self.unknown_retries):
                        unknown += kind == "unknown"
                        self.stats["failures"] += 1
                        if self.stats["failures"] == 1 or self.stats["failures"] % 50 == 0:
                            log.warning("%s writer: batch of %d failed (%s); retrying", self.name, hi - lo, exc)
                        await anyio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter
                        delay = min(delay * 2, self.retry_max_s)
                        continue
                    # ``unknown`` is not reset: once this batch has used its retries, an unknown
                    # error bisects at once (a persistent one would otherwise sleep through
                    # every sub-range of the bisection).
                    pending.pop()
                    if hi - lo > 1:
                        mid = (lo + hi) // 2
                        pending += [(mid, hi), (lo, mid)]  # the left half first
                        self.stats["bisections"] += 1
                        continue
                    error = error_text(exc)
                    await self._quarantine(batch[lo], error)
                    if self.substitute is not None and lo not in substituted:
                        sub = self._substitute(batch[lo], error)
                        if sub is not None:
                            batch[lo] = sub
                            substituted.add(lo)
                            pending.append((lo, hi))
                            continue
                else:
                    pending.pop()
                    delay = self.retry_initial_s
                    self.stats["written"] += hi - lo
                done = hi
                if requeue:
                    self._inflight = batch[done:]
            self.stats["batches"] += 1
        except BaseException:
            if requeue:  # cancelled (shutdown, a bounded flush): back to the head of the queue
                self._queue.extendleft(reversed(batch[done:]))
                self._inflight = []
            raise
        if requeue:
            self._inflight = []

    def _substitute(self, item: T, error: str) -> T | None:
        assert self.substitute is not None
        try:
            return self.substitute(item, error)
        except Exception:  # noqa: BLE001 - no stand-in then; the row is quarantined all the same
            log.exception("%s writer: could not build a stand-in for a quarantined row", self.name)
            return None

    # ------------------------------------------------------------------ quarantine
    async def _quarantine(self, item: T, error: str) -> None:
        try:
            payload = self.encode(item)
        except Exception as exc:  # noqa: BLE001 - keep what can be kept
            payload = json.dumps({"unencodable": repr(item)[:PAYLOAD_MAX // 2], "error": repr(exc)[:300]})
        org = getattr(item, "org", None)
        await self._keep(QuarantineEntry(self.name, org if isinstance(org, str) else None, payload, error))

    async def _keep(self, entry: QuarantineEntry) -> None:
        """Quarantine one entry: the SQL table, else a JSON-lines file. Never raises."""
        entry.bounded()
        self.stats["quarantined"] += 1
        log.error("%s writer: quarantined a row the database refused (org %s): %s", self.name, entry.org, entry.error)
        if self.quarantine is not None:
            try:
                with anyio.fail_after(self.quarantine_timeout_s):
                    await self.quarantine(entry)
                return
            except Exception as exc:  # noqa: BLE001 - the file below keeps it
                log.warning("%s writer: could not store a quarantined row (%s); writing it to %s",
                            self.name, exc, self.spill_dir)
        line = json.dumps({"writer": entry.writer, "org": entry.org, "ts": entry.ts.isoformat(),
                           "error": entry.error, "payload": entry.payload})
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"quarantine-{self.name}-{os.getpid()}.jsonl"
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
            self.stats["quarantined_to_file"] += 1
        except OSError:
            log.exception("%s writer: cannot write quarantined row to %s — logged here only: %s",
                          self.name, self.spill_dir, line[:2000])

    # ------------------------------------------------------------------ spill files
    def _spill_items(self, items: list[T]) -> bool:
        """Append items to this process's spill file; returns whether they are on disk."""
        if not items:
            return True
        try:
            if self._spill is None:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                self._spill_path = self.spill_dir / f"{self.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
                self._spill = open(self._spill_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            self._spill.write("".join(self._spill_line(i) + "\n" for i in items))
            self._spill.flush()
            self.stats["spilled"] += len(items)
        except OSError:
            log.exception("%s writer: cannot spill %d rows to %s — they are lost", self.name, len(items), self.spill_dir)
            return False
        return True

    def _spill_line(self, item: T) -> str:
        """The item's spill line; one that cannot be encoded is still written (as what
        can be said about it), to be quarantined as unreadable when replayed."""
        try:
            line = self.encode(item)
        except Exception as exc:  # noqa: BLE001 - never lose a row silently, never raise from put()
            line = json.dumps({"unencodable": repr(item)[:PAYLOAD_MAX // 2], "error": repr(exc)[:300]})
        return line.replace("\n", "\\n")  # one line per item, whatever encode() did

    def _close_spill(self) -> None:
        if self._spill is not None:
            with contextlib.suppress(OSError):
                self._spill.close()
            self._spill = None
            self._spill_path = None

    def _claim_spills(self) -> list[Path]:
        if not self.spill_dir.is_dir():
            return []
        self._close_spill()  # new spills go to a new file while these replay
        claimed = []
        for path in sorted(self.spill_dir.glob(f"{self.name}-*.jsonl")) + sorted(self.spill_dir.glob(f"{self.name}-*.replaying")):
            target = path if path.suffix == ".replaying" else path.with_suffix(".replaying")
            try:
                if path != target:
                    path.rename(target)
            except OSError:
                continue  # another process claimed it
            claimed.append(target)
        return claimed

    # ------------------------------------------------------------------ journal
    def _journal_item(self, item: T) -> None:
        """Append one row to the journal (one ``write()``; see the module docstring)."""
        try:
            if self._journal is None:
                self._open_journal()
            assert self._journal is not None
            self._journal.write(self._spill_line(item) + "\n")
            self._journal.flush()  # into the kernel: survives the process, not the machine
            self._journal_failed = False
        except OSError as exc:
            if not self._journal_failed:
                log.error("%s writer: cannot write the journal in %s (%s); rows are held in memory only",
                          self.name, self.spill_dir, exc)
            self._journal_failed = True
            self._journal = None

    def _open_journal(self) -> None:
        assert _flock is not None
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"journal-{self.name}-{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
        f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open until sealed
        try:
            _flock(f.fileno(), exclusive=True, block=False)
        except OSError:
            f.close()
            raise
        self._journal, self._journal_path = f, path

    async def _seal_journal(self) -> list[Path]:
        """Seal the current segment (new rows start a new one) and ``fsync`` it in a
        worker thread; return every segment sealed and not yet dropped. A sealed segment
        stays open, and so locked, until its rows are written: no other process claims it."""
        f, path = self._journal, self._journal_path
        if f is not None and path is not None:
            self._journal, self._journal_path = None, None
            self._sealed.append((path, f))
            with contextlib.suppress(OSError, ValueError):
                await anyio.to_thread.run_sync(os.fsync, f.fileno())
        return [p for p, _ in self._sealed]

    def _drop_segments(self, paths: list[Path]) -> None:
        """Delete journal segments whose rows are all written (or spilled), then unlock them."""
        keep = []
        for path, f in self._sealed:
            if path in paths:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    f.close()
            else:
                keep.append((path, f))
        self._sealed = keep

    def _end_journal(self, *, delete: bool) -> None:
        f, path = self._journal, self._journal_path
        self._journal, self._journal_path = None, None
        if f is not None and path is not None:
            self._sealed.append((path, f))
        if delete:
            self._drop_segments([p for p, _ in self._sealed])
        for _, sf in self._sealed:  # not deleted (the spill failed): unlocked, for the next start to replay
            with contextlib.suppress(OSError):
                sf.close()
        self._sealed = []

    def _claim_journals(self) -> None:
        """Turn the journals of dead processes (no lock held on them) into spill files."""
        if _flock is None or not self.spill_dir.is_dir():
            return
        for path in sorted(self.spill_dir.glob(f"journal-{self.name}-*.jsonl")):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # gone: written and dropped, or claimed
            try:
                try:
                    _flock(fd, exclusive=True, block=False)
                except OSError:
                    continue  # a live process (maybe this one) holds it
                # Locked by us now: make it a spill file (<name>-….jsonl) for the replay.
                path.rename(self.spill_dir / f"{self.name}-{path.name.removeprefix(f'journal-{self.name}-')}")
                log.warning("%s writer: replaying %s, the journal of a process that did not shut down",
                            self.name, path.name)
            except OSError:
                continue  # another process claimed it first
            finally:
                os.close(fd)

    async def _replay_spills(self) -> None:
        if self.journal and self.spill_dir.is_dir() and any(self.spill_dir.glob(f"journal-{self.name}-*")):
            await anyio.to_thread.run_sync(self._claim_journals)
        if not self.spill_dir.is_dir() or not any(self.spill_dir.glob(f"{self.name}-*")):
            return
        for path in await anyio.to_thread.run_sync(self._claim_spills):
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                while True:
                    lines = await anyio.to_thread.run_sync(_read_lines, f, self.batch_size)
                    if not lines:
                        break
                    batch = []
                    for line in lines:
                        try:
                            item = self.decode(line)
                        except Exception as exc:  # noqa: BLE001 - a torn last line after a crash, or worse
                            await self._keep(QuarantineEntry(self.name, None, line,
                                                             f"unreadable spill line in {path.name}: {error_text(exc)}"))
                            continue
                        batch.append(self._normalised(item) if self.normalise is not None else item)
                    if batch:
                        async with self._write_lock:
                            await self._write(batch, requeue=False)
                        self.stats["replayed"] += len(batch)
                    async with self._write_lock:
                        await self._write_queued(len(self._queue))  # live rows do not wait for a long replay
            path.unlink(missing_ok=True)
            log.info("%s writer: replayed spill file %s", self.name, path.name)


def _flock_posix(fd: int, *, exclusive: bool, block: bool) -> None:
    import fcntl

    fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if block else fcntl.LOCK_NB))


_flock = None if sys.platform == "win32" else _flock_posix


def _read_lines(f: IO[str], n: int) -> list[str]:
    out = []
    for line in f:
        line = line.strip()
        if line:
            out.append(line)
            if len(out) >= n:
                break
    return out
