"""SessionTracker: sessions held until they close (the worker's way) or tracked weakly (the
controller's), and a drain that reaches every live session, over real loopback connections."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

from farm.handlers import Sink
from farm.smtp.drain import SessionTracker
from farm.smtp.server import SMTP
from tests.support.wait import WAIT, wait_for_async


async def _line(reader: asyncio.StreamReader) -> bytes:
    """The last line of one (possibly multi-line) reply."""
    while True:
        line = await asyncio.wait_for(reader.readline(), WAIT)
        if line[3:4] != b"-":
            return line


async def _client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that has said EHLO and waits (a session with no transaction)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await _line(reader)).startswith(b"220")
    writer.write(b"EHLO client.test\r\n")
    assert (await _line(reader)).startswith(b"250")
    return reader, writer


def _held_server(tracker: SessionTracker, built: list[weakref.ref[Any]]) -> Any:
    """A protocol factory whose sessions the tracker holds until their on_close releases them."""

    def factory() -> SMTP:
        protocol = SMTP(Sink())
        protocol.on_close = tracker.release
        tracker.hold(protocol)
        built.append(weakref.ref(protocol))
        return protocol

    return factory


def test_a_held_session_is_let_go_when_it_closes() -> None:
    asyncio.run(_let_go())


async def _let_go() -> None:
    tracker = SessionTracker()
    built: list[weakref.ref[Any]] = []
    server = await asyncio.get_running_loop().create_server(
        _held_server(tracker, built), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        (r1, w1), (_, w2) = await _client(port), await _client(port)
        assert len(tracker.active) == 2
        w1.write(b"QUIT\r\n")
        assert (await _line(r1)).startswith(b"221")
        w1.close()
        await wait_for_async(lambda: len(tracker.active) == 1, "the QUIT session untracked")
        gc.collect()
        # Nothing but the tracker could keep the closed session: it is gone, the other is not.
        await wait_for_async(lambda: sum(ref() is None for ref in built) == 1, "one freed")
        assert tracker.active == [ref() for ref in built if ref() is not None]
        w2.close()
    finally:
        server.close()


def test_drain_reaches_every_live_session_held_or_weak() -> None:
    asyncio.run(_drain_all())


async def _drain_all() -> None:
    tracker = SessionTracker()
    built: list[weakref.ref[Any]] = []
    held = _held_server(tracker, built)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(held, "127.0.0.1", 0)
    weak = await loop.create_server(lambda: tracker.add(SMTP(Sink())), "127.0.0.1", 0)
    ports = [s.sockets[0].getsockname()[1] for s in (server, weak)]
    try:
        clients = [await _client(port) for port in (*ports, *ports)]
        assert len(tracker.active) == 4
        assert await tracker.drain(WAIT) == 0  # every session was told, and left
        for reader, writer in clients:
            assert (await _line(reader)).startswith(b"421")
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
            writer.close()
        assert tracker.active == []
    finally:
        server.close()
        weak.close()


def test_a_weakly_tracked_session_nobody_keeps_is_forgotten() -> None:
    tracker = SessionTracker()
    protocol = tracker.add(SMTP(Sink()))
    ref = weakref.ref(protocol)
    del protocol
    gc.collect()
    assert ref() is None
    tracker.release(object())  # not held: nothing happens
    assert tracker.active == []
