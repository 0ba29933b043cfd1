"""Identifiers for requests, attempts, audit events and reservations.

They must be unique (across processes, replicas and restarts), not unpredictable: none
of them is a credential (API keys, node credentials and tokens use ``secrets``). A
request needs four, and ``os.urandom`` is a system call each time (0.6 µs on a quiet
machine here, far more when the host is busy), so an id is a per-process random prefix
(drawn once, and again in a forked child) followed by a counter: 32 hex digits, like
``uuid4().hex`` (0.4 µs).
"""

from __future__ import annotations

import itertools
import os

__all__ = ["new_id"]


def _reseed() -> None:
    global _prefix, _counter
    _prefix = os.urandom(8).hex()
    _counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


_prefix = ""
_counter = itertools.count()
_reseed()
os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """A new unique id: 32 lowercase hex digits."""
    return f"{_prefix}{next(_counter) & 0xFFFFFFFFFFFFFFFF:016x}"
