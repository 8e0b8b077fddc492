"""Reusable connections to one next hop (per worker, per event loop).

At most ``max_connections`` connections are open to the next hop at once (in use, idle,
being opened or closing): one more is waited for at most ``wait`` seconds, then refused with
:data:`NEXT_HOP_BUSY` (``451 4.4.5``), so that clients cannot exhaust the next hop's processes.
At most ``size`` idle connections are kept, each for at most ``idle_timeout`` seconds, and a
connection carries at most ``max_messages`` transactions before it is closed. A connection is
given back only in a clean state (its transaction finished, or reset with ``RSET``); one whose
state is unknown is dropped. An idle connection that the next hop closed or wrote to meanwhile
(an idle-timeout ``421``) is dropped when it is next taken.
"""

from __future__ import annotations

import asyncio

from farm.relay.client import (
    NEXT_HOP_UNAVAILABLE,
    ClientSettings,
    Connection,
    NextHopError,
    connect,
)
from farm.relay.routes import Route

__all__ = ["NEXT_HOP_BUSY", "NextHopBusy", "Pool"]

NEXT_HOP_BUSY = "451 4.4.5 Too many connections to the next hop, try again later"


class NextHopBusy(NextHopError):
    """Every connection the pool may open to the next hop is open, and none came free in time."""


class Pool:
    """Connections to ``route``; ``acquire`` one, then ``release`` or ``discard`` it."""

    def __init__(
        self,
        route: Route,
        settings: ClientSettings,
        *,
        size: int = 10,
        idle_timeout: float = 30.0,
        max_messages: int = 100,
        max_connections: int = 0,
        wait: float = 5.0,
    ) -> None:
        self.route = route
        self.settings = settings
        self.size = size
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        #: Connections open at once, at most (0: no cap); ``wait``: seconds to wait for one.
        self.max_connections = max_connections
        self.wait = wait
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._connecting = 0
        self._waiters: list[asyncio.Future[None]] = []
        self.closed = False
        #: Connections opened so far (for tests and metrics).
        self.opened = 0

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def open(self) -> int:
        """Connections that count against ``max_connections``."""
        return len(self._busy) + len(self._idle) + self._connecting + len(self._closing)

    async def acquire(self, name: str, *, fresh: bool = False) -> tuple[Connection, bool]:
        """A connection and whether it was reused (``name``: our ``EHLO`` name for a new one).

        ``fresh``: a new connection, and the idle ones are closed (one was found dead).
        """
        if fresh:
            while self._idle:
                connection = self._idle.pop()
                self._cancel_timer(connection)
                self._close_soon(connection)
        deadline: float | None = None  # set when a wait begins (most acquires never wait)
        while True:
            if (idle := self._take_idle()) is not None:
                return idle, True
            if not self.max_connections or self.open < self.max_connections:
                break
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.wait
            await self._wait_for_room(deadline)
        self._connecting += 1
        try:
            connection = await connect(self.route, self.settings, name)
        finally:
            self._connecting -= 1
            self._room_made()  # (a failed connect makes room; a good one is busy below)
        self.opened += 1
        if self.closed:
            self._close_soon(connection)
            raise NextHopError(NEXT_HOP_UNAVAILABLE, "relay closed (stopping)")
        self._busy.add(connection)
        return connection, False

    def _take_idle(self) -> Connection | None:
        """An idle connection still usable, now busy (closing the dead ones met); None if
        there is none: then :meth:`acquire` opens one or waits for room."""
        idle = self._idle
        while idle:
            connection = idle.pop()  # the most recently used: least likely timed out
            self._cancel_timer(connection)
            if connection.usable():
                self._busy.add(connection)
                return connection
            self._close_soon(connection)
        return None

    def release(self, connection: Connection) -> None:
        """Take back a connection in a clean state: idle it, or close it when not wanted."""
        self._busy.discard(connection)
        if (
            self.closed
            or not connection.usable()
            or connection.transactions >= self.max_messages
            or len(self._idle) >= self.size
            or self.idle_timeout <= 0
        ):
            self._close_soon(connection)
            return
        connection.idle_handle = connection.loop.call_later(
            self.idle_timeout, self._expire, connection
        )
        self._idle.append(connection)
        self._room_made()

    def discard(self, connection: Connection) -> None:
        """Drop a connection whose state is unknown."""
        self._busy.discard(connection)
        connection.abort()
        self._room_made()

    async def _wait_for_room(self, deadline: float) -> None:
        """Wait until a connection is given back or closed; NextHopBusy past ``deadline``."""
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0 or self.closed:
            raise NextHopBusy(
                NEXT_HOP_BUSY, f"{self.max_connections} connections open to the next hop"
            )
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait((waiter,), timeout=remaining)
        finally:
            self._waiters.remove(waiter)

    def _room_made(self) -> None:
        """A connection was given back or closed: every waiter looks again."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _expire(self, connection: Connection) -> None:
        connection.idle_handle = None
        if connection in self._idle:
            self._idle.remove(connection)
            self._close_soon(connection)

    @staticmethod
    def _cancel_timer(connection: Connection) -> None:
        if connection.idle_handle is not None:
            connection.idle_handle.cancel()
            connection.idle_handle = None

    def _close_soon(self, connection: Connection) -> None:
        task = connection.loop.create_task(connection.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closed_one)

    def _closed_one(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        self._room_made()

    async def aclose(self) -> None:
        """Close every connection: idle ones with ``QUIT``, ones in use at once."""
        self.closed = True
        while self._idle:
            connection = self._idle.pop()
            self._cancel_timer(connection)
            self._close_soon(connection)
        for connection in list(self._busy):
            self.discard(connection)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
