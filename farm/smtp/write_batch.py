"""Replies of many sessions written together, once the event loop's pass over its ready
connections is done.

On loopback, and on any host whose clients wait for each reply, a write to a client that sleeps
costs a wake-up of that client; written one by one between the other sessions' work, nearly
every reply pays one. Held until the end of the pass (``call_soon``: after the callbacks of
the connections that were ready together), the replies go out back to back and the client side
wakes once for them. A reply waits at most for the rest of that pass.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger("farm.smtp")


class DeferredWriter(Protocol):
    """What the batch needs of a session: its loop, and to write what it held back."""

    loop: asyncio.AbstractEventLoop

    def _write_deferred(self) -> None: ...


class WriteBatch:
    """The sessions of one server (one event loop) with replies held for the end of the pass."""

    __slots__ = ("waiting",)

    #: Replies longer than this are written at once (a batch holds only short ones).
    HOLD_LIMIT = 4096

    def __init__(self) -> None:
        #: The sessions holding replies, in the order they held them (the engine's ``_flush``
        #: does what :meth:`hold` does, inline).
        self.waiting: list[DeferredWriter] = []

    def hold(self, session: DeferredWriter) -> None:
        """``session`` holds a reply back: write it at the end of this pass of the loop."""
        if not self.waiting:
            session.loop.call_soon(self.write)
        self.waiting.append(session)

    def write(self) -> None:
        """Write every held reply (the end of the loop's pass)."""
        waiting, self.waiting = self.waiting, []
        for session in waiting:
            try:
                session._write_deferred()
            except Exception:  # one session's broken transport must not keep the others' replies
                log.exception("writing a held reply failed")
