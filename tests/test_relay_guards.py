"""The relay's client against hostile or broken next hops (security notes 6.1 items 36-38):
unsolicited replies, oversized replies, and no CR/LF ever written into a command."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from farm.controller import Controller
from farm.relay_client import ClientSettings, ProtocolError, connect
from farm.relay_routes import Route
from tests.test_relay_support import (
    DOMAIN,
    FakeNextHop,
    LoopThread,
    attempt,
    message,
    relay_servers,
    smtp_dialogue,
    wait_until,
)
from tests.test_relay_support import make_relay as relay


@pytest.fixture
def serve(make_controller: Any) -> Iterator[Callable[..., Controller]]:
    with relay_servers(make_controller) as start:
        yield start


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


def answering(verb: bytes, reply: bytes) -> Any:
    """A well-behaved fake next hop except that it answers ``verb`` with ``reply``."""

    def answer(line: bytes, transaction: int) -> bytes | None:
        return reply if line.upper().startswith(verb) else None

    async def script(reader: Any, writer: Any, hop: FakeNextHop) -> None:
        await smtp_dialogue(reader, writer, hop, answer)

    return script


BROKEN = {
    "extra line after EHLO": (b"EHLO", b"250 fake\r\n250 surprise\r\n"),
    "extra line after MAIL": (b"MAIL", b"250 ok\r\n250 2.1.5 bogus rcpt ok\r\n"),
    "extra line after RCPT": (b"RCPT", b"250 ok\r\n354 bogus go ahead\r\n"),
    "code change in multi-line": (b"EHLO", b"250-fake\r\n550 oops\r\n"),
    "malformed reply": (b"MAIL", b"hello there\r\n"),
    "100k-line reply": (b"EHLO", b"250-x\r\n" * 100_000 + b"250 end\r\n"),
    "1 MiB line": (b"MAIL", b"250 " + b"x" * (1 << 20) + b"\r\n"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_next_hop_temp_fails_and_is_not_reused(
    serve: Any, loop_thread: LoopThread, case: str
) -> None:
    verb, reply = BROKEN[case]
    hop = FakeNextHop(answering(verb, reply), loop_thread).start()
    handler = relay(hop.next_hop)
    controller = serve(handler)
    for _ in range(2):
        result = attempt(controller.port, [f"r@{DOMAIN}"], message("broken"))
        assert result.final is None, result
        code, text = result.rcpt[0]
        assert code == 451 and text.startswith(b"4.4."), result
    assert hop.messages == []
    assert hop.connections == 2  # each attempt on a new connection: none was pooled
    wait_until(lambda: hop.closed == 2, "both connections closed")


def test_unsolicited_reply_while_idle_is_never_taken_as_an_answer(
    serve: Any, loop_thread: LoopThread
) -> None:
    """A next hop that writes a stray ``250`` on an idle pooled connection: the connection is
    dropped when next taken, not used (the stray line would answer our next MAIL)."""
    stray = asyncio.Event()

    async def script(reader: Any, writer: Any, hop: FakeNextHop) -> None:
        def answer(line: bytes, transaction: int) -> bytes | None:
            if line.upper().startswith(b"MAIL") and transaction == 2:
                return b"550 5.7.1 second transaction on this connection\r\n"
            return None

        session = asyncio.create_task(smtp_dialogue(reader, writer, hop, answer))
        if hop.connections == 1:
            await stray.wait()
            writer.write(b"250 2.0.0 stray\r\n")
            await writer.drain()
        await session

    hop = FakeNextHop(script, loop_thread).start()
    handler = relay(hop.next_hop)
    controller = serve(handler)
    assert attempt(controller.port, [f"r@{DOMAIN}"], message("first")).accepted
    loop_thread.loop.call_soon_threadsafe(stray.set)
    wait_until(lambda: sum(p.idle for p in handler._pools.values()) == 1, "idle connection")

    def stray_buffered() -> bool:
        pool = next(iter(handler._pools.values()))
        return bool(pool._idle) and not pool._idle[0].usable()

    wait_until(stray_buffered, "the stray reply to arrive")
    result = attempt(controller.port, [f"r@{DOMAIN}"], message("second"))
    assert result.accepted, result
    assert len(hop.messages) == 2 and hop.connections == 2


def test_no_cr_lf_nul_in_commands(loop_thread: LoopThread) -> None:
    hop = FakeNextHop(answering(b"NOOP", b"250 ok\r\n"), loop_thread).start()

    async def run() -> None:
        connection = await connect(Route("127.0.0.1", hop.port), ClientSettings(5.0), "me")
        try:
            for line in ("MAIL FROM:<a@b>\r\nRCPT TO:<x@y>", "RCPT TO:<a\nb>", "NOOP \x00"):
                with pytest.raises(ProtocolError):
                    await connection.command(line)
            assert (await connection.command("NOOP")).ok
        finally:
            await connection.aclose()

    loop_thread.run(run())
    assert [line[:4] for line in hop.lines] == [b"EHLO", b"NOOP", b"QUIT"]
