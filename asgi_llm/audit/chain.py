"""Audit events and their hash chain.

Each stored event carries ``seq`` (its position), ``prev_hash`` (the previous event's
hash; :data:`GENESIS` for the first) and ``hash``::

    hash = sha256(prev_hash + canonical_json(event fields + seq + prev_hash))

so changing any field of an event breaks its own hash, deleting or reordering events
breaks the next event's ``prev_hash`` link (and the ``seq`` sequence), and truncating
the tail no longer matches the chain head (``audit_head``). :func:`verify_events`
reports the first broken link.

What a hash chain cannot do alone: someone with write access to the database can
rewrite the whole chain from the tampered event on, head included. Record the head
(``asgi-llm audit verify`` prints it) somewhere else from time to time to anchor it.

Events carry no prompt content: who (org, actor key id), what (action, model, route),
the verdict, status, attempts and request id.

Every event is :func:`bounded` before it is queued (the audit writer's ``normalise``
step), so the chain is computed over values the database stores exactly as hashed: an
unauthenticated ``GET /admin/<450 characters>`` is recorded with its action cut to the
column (ending in ``…``), not refused. Should the database still refuse an event, the
writer quarantines it and appends a :func:`quarantine_placeholder` in its place: the
chain records that an event was set aside, and has no gap (``seq`` and ``prev_hash``
are assigned at insert, so a refused event never took a place in it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from asgi_llm._bounds import bound_text_fields, bounded_int, bounded_text
from asgi_llm._ids import new_id

__all__ = ["DETAIL_MAX", "GENESIS", "VERDICTS", "AuditEvent", "ChainBreak", "VerifyResult", "bounded", "canonical",
           "event_hash", "quarantine_placeholder", "verify_events"]

GENESIS = "0" * 64
"""The ``prev_hash`` of the first event."""

VERDICTS = ("allowed", "failed_over", "rate_limited", "denied", "failed", "error")

DETAIL_MAX = 8000
"""The longest ``detail`` JSON text an event keeps; a longer one is replaced by its
first characters under ``{"truncated": …}``."""

# The json.dumps settings of ``detail`` and of the hashed content, as encoders built once
# (json.dumps builds one per call); the output is the same.
_DETAIL_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_CANONICAL_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_EPOCH = dt.datetime(1970, 1, 1)


def _now() -> dt.datetime:
    # Naive UTC, floored to the microsecond like datetime.now(); half the cost of
    # datetime.now(dt.UTC).replace(tzinfo=None), whose keyword replace() dominates.
    return _EPOCH + dt.timedelta(microseconds=time.time_ns() // 1000)


@dataclass(slots=True)
class AuditEvent:
    """One audited request. ``seq``/``prev_hash``/``hash`` are set when it is stored.

    ``kind``: ``inference`` | ``admin`` | ``node`` | ``quarantined`` (stands in for an event
    the database refused, see :func:`quarantine_placeholder`). ``action``: the endpoint for
    inference (``chat``), ``METHOD /path`` for admin calls (``POST /admin/keys``).
    ``verdict``: allowed | failed_over | rate_limited | denied | failed | error.
    ``ts`` is naive UTC.
    """

    kind: str
    org: str
    actor: str
    action: str
    verdict: str
    status: int
    request_id: str
    target: str | None = None
    model: str | None = None
    route: str | None = None
    attempts: int = 0
    detail: dict[str, Any] | None = None
    event_id: str = field(default_factory=new_id)
    ts: dt.datetime = field(default_factory=_now)
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None

    def content(self) -> dict[str, Any]:
        """The hashed fields (everything but ``hash``), JSON-ready."""
        return self._content(self.seq, self.prev_hash)

    def _content(self, seq: int | None, prev_hash: str | None) -> dict[str, Any]:
        return {
            "seq": seq, "prev_hash": prev_hash, "event_id": self.event_id,
            "ts": self.ts.isoformat(timespec="microseconds"), "kind": self.kind, "org": self.org,
            "actor": self.actor, "action": self.action, "target": self.target, "model": self.model,
            "route": self.route, "verdict": self.verdict, "status": self.status, "attempts": self.attempts,
            "request_id": self.request_id, "detail": self.detail_text(),
        }

    def detail_text(self) -> str | None:
        return None if self.detail is None else _DETAIL_ENCODER.encode(self.detail)

    def to_json(self) -> str:
        """One spill-file line (chain fields excluded: they are assigned at insert)."""
        d = self.content()
        for k in ("seq", "prev_hash"):
            d.pop(k)
        d["detail"] = self.detail
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> AuditEvent:
        d = json.loads(line)
        d["ts"] = dt.datetime.fromisoformat(d["ts"])
        return cls(**d)

    @classmethod
    def from_row(cls, row: Any) -> AuditEvent:
        """From a database row (mapping)."""
        detail = row["detail"]
        return cls(
            kind=row["kind"], org=row["org"], actor=row["actor"], action=row["action"], verdict=row["verdict"],
            status=row["status"], request_id=row["request_id"], target=row["target"], model=row["model"],
            route=row["route"], attempts=row["attempts"], detail=None if detail is None else json.loads(detail),
            event_id=row["event_id"], ts=row["ts"], seq=row["seq"], prev_hash=row["prev_hash"], hash=row["hash"],
        )

    def to_api(self) -> dict[str, Any]:
        d = self.content()
        d["detail"] = self.detail
        d["hash"] = self.hash
        return d


# (field, column length, nullable): the audit_events columns (tests pin them to the table).
TEXT_LIMITS: tuple[tuple[str, int, bool], ...] = (
    ("event_id", 64, False), ("kind", 16, False), ("org", 200, False), ("actor", 200, False),
    ("action", 400, False), ("target", 400, True), ("model", 200, True), ("route", 400, True),
    ("verdict", 32, False), ("request_id", 128, False),
)
_INT32 = 2**31 - 1


def bounded(event: AuditEvent) -> AuditEvent:
    """Make ``event`` storable as it is (in place; returned for chaining).

    Text fits its column (cut with a trailing ``…``; NUL and lone surrogates replaced),
    ``status``/``attempts`` fit a 32-bit column, ``detail`` is JSON-encodable and at most
    :data:`DETAIL_MAX` characters, ``ts`` is a naive UTC datetime. Never raises.
    """
    bound_text_fields(event, (getattr(event, name) for name, _, _ in TEXT_LIMITS), TEXT_LIMITS)
    for name in ("status", "attempts"):
        v = getattr(event, name)
        if not (type(v) is int and -_INT32 <= v <= _INT32):
            setattr(event, name, bounded_int(v, -_INT32 - 1, _INT32)[0])
    if event.detail is not None:
        try:
            text = _DETAIL_ENCODER.encode(event.detail)
        except Exception as exc:  # noqa: BLE001 - not JSON: keep what can be said about it
            event.detail = {"unencodable": f"{type(exc).__name__}: {exc}"[:200]}
        else:
            if len(text) > DETAIL_MAX:
                event.detail = {"truncated": bounded_text(text, DETAIL_MAX - 100)[0]}
    if not isinstance(event.ts, dt.datetime):
        event.ts = _now()
    elif event.ts.tzinfo is not None:
        event.ts = event.ts.astimezone(dt.UTC).replace(tzinfo=None)
    return event


def quarantine_placeholder(event: AuditEvent, error: str) -> AuditEvent:
    """The event appended to the chain in place of one the database refused.

    Its ``event_id`` derives from the refused one's, so a replayed batch does not append
    it twice; it says who and what (bounded again), and why it stands in.
    """
    return bounded(AuditEvent(
        kind="quarantined", org=event.org, actor=event.actor, action="quarantined", verdict="error",
        status=event.status, request_id=event.request_id, target=event.event_id,
        detail={"event_id": event.event_id, "kind": event.kind, "action": event.action, "error": error[:500]},
        event_id=("q-" + str(event.event_id))[:64], ts=event.ts,
    ))


def canonical(content: dict[str, Any]) -> str:
    return _CANONICAL_ENCODER.encode(content)


def _digest(prev_hash: str, content: dict[str, Any]) -> str:
    return hashlib.sha256((prev_hash + canonical(content)).encode()).hexdigest()


def event_hash(event: AuditEvent) -> str:
    """``sha256(prev_hash + canonical(content))`` as hex."""
    return _digest(event.prev_hash or "", event.content())


def links(events: Iterable[AuditEvent], head_seq: int, head_hash: str) -> Iterator[tuple[AuditEvent, dict[str, Any], str]]:
    """Chain ``events`` after the head *without changing them*: yields each event with
    its hashed content (``seq`` and ``prev_hash`` included) and its hash.

    A writer inserts these as they are: a failed transaction then leaves no stale chain
    fields on the caller's events, and nothing is copied.
    """
    seq, prev = head_seq, head_hash
    for e in events:
        seq += 1
        content = e._content(seq, prev)
        prev = _digest(prev, content)
        yield e, content, prev


def seal(events: Iterable[AuditEvent], head_seq: int, head_hash: str) -> tuple[int, str]:
    """Assign ``seq``/``prev_hash``/``hash`` after the head; return the new head."""
    seq, prev = head_seq, head_hash
    for e, content, digest in links(events, head_seq, head_hash):
        e.seq, e.prev_hash, e.hash = content["seq"], content["prev_hash"], digest
        seq, prev = content["seq"], digest
    return seq, prev


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first broken link: where, and why."""

    seq: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of a chain verification."""

    ok: bool
    events: int
    head_seq: int
    head_hash: str
    first_break: ChainBreak | None = None

    def to_api(self) -> dict[str, Any]:
        return {"ok": self.ok, "events": self.events, "head_seq": self.head_seq, "head_hash": self.head_hash,
                "first_break": None if self.first_break is None else {"seq": self.first_break.seq, "reason": self.first_break.reason}}


class ChainVerifier:
    """Feed events in ``seq`` order; remembers the first broken link."""

    def __init__(self) -> None:
        self.expected_seq = 1
        self.prev = GENESIS
        self.count = 0
        self.first_break: ChainBreak | None = None

    def feed(self, e: AuditEvent) -> None:
        self.count += 1
        if self.first_break is not None:
            return
        if e.seq != self.expected_seq:
            what = "deleted" if (e.seq or 0) > self.expected_seq else "duplicated or reordered"
            self.first_break = ChainBreak(self.expected_seq, f"sequence gap: expected seq {self.expected_seq}, found {e.seq} (event {what})")
        elif e.prev_hash != self.prev:
            self.first_break = ChainBreak(e.seq, "prev_hash does not match the previous event's hash (event deleted, inserted or reordered)")
        elif event_hash(e) != e.hash:
            self.first_break = ChainBreak(e.seq, "hash mismatch: the event was modified")
        self.expected_seq = (e.seq or 0) + 1
        self.prev = e.hash or ""

    def result(self, head_seq: int, head_hash: str) -> VerifyResult:
        brk = self.first_break
        if brk is None and (head_seq != self.expected_seq - 1 or head_hash != self.prev):
            brk = ChainBreak(head_seq, f"chain ends at seq {self.expected_seq - 1} but the head says {head_seq}: "
                                       "events at the end were deleted (or the head was modified)")
        return VerifyResult(ok=brk is None, events=self.count, head_seq=head_seq, head_hash=head_hash, first_break=brk)


def verify_events(events: Iterable[AuditEvent], head_seq: int, head_hash: str) -> VerifyResult:
    """Verify a whole chain given in ``seq`` order against its head."""
    v = ChainVerifier()
    for e in events:
        v.feed(e)
    return v.result(head_seq, head_hash)
