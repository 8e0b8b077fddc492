"""The first idle deadline of every session of one server, kept by one timer of the loop.

A session arms its idle timer once, when it greets, ``timeout`` seconds ahead; with every
session of a server on the same timeout, their deadlines come in the order they were armed.
So an insertion-ordered dict is the queue (a session that closes leaves it at once, in O(1)),
and one loop timer, at the earliest deadline, serves them all. A uvloop timer per connection
costs a libuv handle made, started, stopped and closed (about 8k instructions a connection);
a place in this dict costs a tenth of that.

When its deadline comes a session leaves the queue and its ``_on_timer`` runs: it acts on what
expired (farm.smtp.deadlines) or, for a session still active, arms a timer of its own for its
next deadline (only sessions that outlive the timeout ever need one).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger("farm.smtp")


class Expiring(Protocol):
    """What the queue needs of a session: to be told its deadline came."""

    def _on_timer(self) -> None: ...


class TimerQueue:
    """Deadlines ``timeout`` seconds after each :meth:`add`, in that order, on one timer."""

    __slots__ = ("_due", "_handle", "timeout")

    #: A deadline this close ahead is served with the ones passed (loops' timers may fire
    #: that early: asyncio's within its clock resolution, uvloop's within a millisecond).
    EARLY = 0.001

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._due: dict[Expiring, float] = {}
        self._handle: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, session: Expiring, loop: asyncio.AbstractEventLoop) -> None:
        """Queue ``session``'s deadline, ``timeout`` seconds from now (once per session)."""
        deadline = self._due[session] = loop.time() + self.timeout
        if self._handle is None:
            self._handle = loop.call_at(deadline, self._expire, loop)

    def discard(self, session: Expiring) -> None:
        """``session`` needs its deadline no more (its connection is gone)."""
        self._due.pop(session, None)

    def when(self, session: Expiring) -> float | None:
        """``session``'s deadline (None: not queued)."""
        return self._due.get(session)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        now = loop.time() + self.EARLY
        due = self._due
        expired = []
        for session, deadline in due.items():
            if deadline > now:
                break
            expired.append(session)
        for session in expired:
            del due[session]
        for session in expired:
            try:
                session._on_timer()
            except Exception:  # one session's failure must not keep the others' deadlines
                log.exception("a session's timer failed")
        if due and self._handle is None:
            self._handle = loop.call_at(next(iter(due.values())), self._expire, loop)
