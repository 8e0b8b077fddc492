"""Graceful drain: finish transactions in flight, tell idle sessions 421, close the rest."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger("farm.smtp")


class SessionTracker:
    """Keeps track of the live SMTP sessions of one server, so they can be drained.

    :meth:`add` tracks a session until nothing else refers to it (a weak reference).
    :attr:`hold` tracks it in a plain set, cheaper per session, until :attr:`release` (a
    no-op for a session not held): for an owner that is told when each session closes (the
    farm's worker, from ``on_close``).
    """

    def __init__(self) -> None:
        self._sessions: weakref.WeakSet[Any] = weakref.WeakSet()
        self._held: set[Any] = set()
        # hold() and release() are the set's own methods (no Python call per session).
        self.hold: Callable[[Any], None] = self._held.add
        self.release: Callable[[Any], None] = self._held.discard

    def add(self, protocol: Any) -> Any:
        """Track ``protocol`` (an ``SMTP`` instance) and return it."""
        self._sessions.add(protocol)
        return protocol

    @property
    def active(self) -> list[Any]:
        """Sessions whose connection is still open."""
        return [p for p in (*self._held, *self._sessions) if p.transport is not None]

    async def drain(self, timeout: float | None) -> int:
        """Ask every session to finish, wait up to ``timeout`` s, then abort the rest.

        Returns how many sessions had to be aborted.
        """
        sessions = self.active
        for protocol in sessions:
            protocol.begin_shutdown()
        waiters = [asyncio.ensure_future(p.wait_closed()) for p in sessions]
        if not waiters:
            return 0
        _, pending = await asyncio.wait(waiters, timeout=timeout)
        for waiter in pending:
            waiter.cancel()
        stragglers = [p for p in sessions if p.transport is not None]
        for protocol in stragglers:
            protocol.abort()
        if stragglers:
            log.warning(
                "drain: aborted %d session(s) still busy after %ss", len(stragglers), timeout
            )
        return len(stragglers)
