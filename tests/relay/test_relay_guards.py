"""The relay's client against hostile or broken next hops (security notes 6.1 items 36-38):
unsolicited replies, oversized replies, and no CR/LF ever written into a command; with a
pipelining (and chunking) next hop too, where exactly the replies asked for are read."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from farm.relay.client import ClientSettings, ProtocolError, connect
from farm.relay.routes import Route
from tests.support.relay import DOMAIN, FakeNextHop, LoopThread, attempt, message, smtp_dialogue
from tests.support.relay import make_relay as relay
from tests.support.wait import wait_for


def answering(verb: bytes, reply: bytes) -> Any:
    """A well-behaved fake next hop except that it answers ``verb`` with ``reply``."""
    return scripted({verb: reply})


def scripted(replies: dict[bytes, bytes], **options: bool) -> Any:
    """A well-behaved fake next hop (``smtp_dialogue`` ``options``) except for ``replies``: a
    line starting with a key gets its value."""

    def answer(line: bytes, transaction: int) -> bytes | None:
        for verb, reply in replies.items():
            if line.upper().startswith(verb):
                return reply
        return None

    async def script(reader: Any, writer: Any, hop: FakeNextHop) -> None:
        await smtp_dialogue(reader, writer, hop, answer, **options)

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
    wait_for(lambda: hop.closed == 2, "both connections closed")


#: Against a next hop that insists on MAIL + RCPT in one write and answers both in one write:
#: its replies, and what the client is told at RCPT.
PIPELINED_BROKEN = {
    "extra line after MAIL": ({b"MAIL": b"250 ok\r\n250 2.1.5 bogus rcpt ok\r\n"}, 451),
    "extra line after RCPT": ({b"RCPT": b"250 ok\r\n354 bogus go ahead\r\n"}, 451),
    "extra line after a refused MAIL": (
        {b"MAIL": b"550 5.7.1 no\r\n", b"RCPT": b"503 5.5.1 need MAIL\r\n250 2.1.5 bogus\r\n"},
        451,
    ),
    "RCPT accepted after a refused MAIL": (
        {b"MAIL": b"550 5.7.1 no\r\n", b"RCPT": b"250 2.1.5 ok\r\n"},
        550,
    ),
    "malformed reply to RCPT": ({b"RCPT": b"hello there\r\n"}, 451),
    "closed before replying": ({b"RCPT": b""}, 451),
}


@pytest.mark.parametrize("case", PIPELINED_BROKEN)
def test_broken_pipelining_next_hop_fails_safely(
    serve: Any, loop_thread: LoopThread, case: str
) -> None:
    replies, code = PIPELINED_BROKEN[case]
    hop = FakeNextHop(scripted(replies, pipelining=True), loop_thread).start()
    controller = serve(relay(hop.next_hop, timeout=3.0))
    for _ in range(2):
        result = attempt(controller.port, [f"r@{DOMAIN}"], message("broken"))
        assert result.final is None and result.rcpt[0][0] == code, result
        if code == 451:
            assert result.rcpt[0][1].startswith(b"4.4."), result
    assert hop.messages == []
    assert hop.connections == 2  # the connection was never given back to the pool
    wait_for(lambda: hop.closed == 2, "both connections closed")


#: Broken replies to the message content (or to DATA): the client never gets a 250.
CONTENT_BROKEN = {
    "extra line after the BDAT reply": ({b"BDAT": b"250 ok\r\n250 2.0.0 bogus\r\n"}, True),
    "354 to BDAT": ({b"BDAT": b"354 go ahead\r\n"}, True),
    "extra line after the data's reply": ({b".": b"250 ok\r\n250 2.0.0 bogus\r\n"}, False),
    "250 to DATA": ({b"DATA": b"250 2.0.0 ok\r\n"}, False),
}


@pytest.mark.parametrize("case", CONTENT_BROKEN)
def test_broken_reply_to_content_is_never_a_250(
    serve: Any, loop_thread: LoopThread, case: str
) -> None:
    replies, chunking = CONTENT_BROKEN[case]
    hop = FakeNextHop(scripted(replies, pipelining=True, chunking=chunking), loop_thread).start()
    controller = serve(relay(hop.next_hop, timeout=3.0))
    for _ in range(2):
        result = attempt(controller.port, [f"r@{DOMAIN}"], message("broken"))
        assert result.rcpt == [(250, b"2.1.5 OK")], result
        assert result.final is not None and result.final[0] == 451, result
    assert hop.connections == 2
    wait_for(lambda: hop.closed == 2, "both connections closed")


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
    wait_for(lambda: sum(p.idle for p in handler._pools.values()) == 1, "idle connection")

    def stray_buffered() -> bool:
        pool = next(iter(handler._pools.values()))
        return bool(pool._idle) and not pool._idle[0].usable()

    wait_for(stray_buffered, "the stray reply to arrive")
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
