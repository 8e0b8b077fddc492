"""Reusable connections to one next hop (per worker, per event loop).

At most ``size`` idle connections are kept, each for at most ``idle_timeout`` seconds, and a
connection carries at most ``max_messages`` transactions before it is closed. A connection is
given back only in a clean state (its transaction finished, or reset with ``RSET``); one whose
state is unknown is dropped. An idle connection that the next hop closed or wrote to meanwhile
(an idle-timeout ``421``) is dropped when it is next taken.
"""

from __future__ import annotations

import asyncio

from farm.relay_client import (
    NEXT_HOP_UNAVAILABLE,
    ClientSettings,
    Connection,
    NextHopError,
    connect,
)
from farm.relay_routes import Route

__all__ = ["Pool"]


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
    ) -> None:
        self.route = route
        self.settings = settings
        self.size = size
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self.closed = False
        #: Connections opened so far (for tests and metrics).
        self.opened = 0

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def acquire(self, name: str, *, fresh: bool = False) -> tuple[Connection, bool]:
        """A connection and whether it was reused (``name``: our ``EHLO`` name for a new one).

        ``fresh``: a new connection, and the idle ones are closed (one was found dead).
        """
        if fresh:
            while self._idle:
                connection = self._idle.pop()
                self._cancel_timer(connection)
                self._close_soon(connection)
        while self._idle:
            connection = self._idle.pop()  # the most recently used: least likely timed out
            self._cancel_timer(connection)
            if connection.usable():
                self._busy.add(connection)
                return connection, True
            self._close_soon(connection)
        connection = await connect(self.route, self.settings, name)
        self.opened += 1
        if self.closed:
            self._close_soon(connection)
            raise NextHopError(NEXT_HOP_UNAVAILABLE, "relay closed (stopping)")
        self._busy.add(connection)
        return connection, False

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

    def discard(self, connection: Connection) -> None:
        """Drop a connection whose state is unknown."""
        self._busy.discard(connection)
        connection.abort()

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
        task.add_done_callback(self._closing.discard)

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
