"""The relay client's reply parser (``farm.relay.reply_reader``, compiled): whole replies
however the bytes are split, text made printable, and the limits that close a connection."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.relay.reply_reader import MAX_LINE, MAX_REPLY_LINES, NEXT_HOP_LOST, Reply, ReplyReader

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

codes = st.integers(200, 599)
texts = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


def wire(code: int, lines: list[str]) -> bytes:
    """A reply as a server writes it: ``NNN-`` on every line but the last."""
    out = [f"{code}-{text}\r\n" for text in lines[:-1]] + [f"{code} {lines[-1]}\r\n"]
    return "".join(out).encode()


def read_all(chunks: list[bytes]) -> tuple[list[Reply], bytearray]:
    """Feed ``chunks`` one by one, taking every whole reply after each: the replies, the rest."""
    reader, buffer, replies = ReplyReader(), bytearray(), []
    for chunk in chunks:
        buffer += chunk
        while (reply := reader.take(buffer)) is not None:
            replies.append(reply)
    return replies, buffer


@FAST
@given(st.lists(st.tuples(codes, st.lists(texts, min_size=1, max_size=5)), max_size=4), st.data())
def test_replies_do_not_depend_on_how_the_bytes_are_split(
    replies: list[tuple[int, list[str]]], data: st.DataObject
) -> None:
    stream = b"".join(wire(code, lines) for code, lines in replies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    got, rest = read_all(chunks)
    assert rest == b""
    assert [(r.code, r.lines) for r in got] == [
        (code, [text.strip() for text in lines]) for code, lines in replies
    ]


def test_reply_fields() -> None:
    [multi], _ = read_all([b"250-farm.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n"])
    assert (multi.code, multi.ok, multi.text) == (250, True, "farm.test PIPELINING CHUNKING")
    assert multi.lines == ["farm.test", "PIPELINING", "CHUNKING"]
    [refusal], _ = read_all([b"421 4.3.2 closing\n"])  # a bare LF ends a line too
    assert (refusal.ok, refusal.passthrough()) == (False, "451 4.3.2 closing")
    [bare], _ = read_all([b"554\r\n"])
    assert (bare.text, bare.passthrough()) == ("", "554 Requested action not taken")
    [odd], _ = read_all([b"354 go ahead\r\n"])
    assert odd.passthrough() == NEXT_HOP_LOST  # neither 4xx nor 5xx: not passed through
    assert repr(odd) == "354 go ahead"


def test_text_is_made_printable() -> None:
    [reply], _ = read_all(["550 5.1.1 n\u00e4h \x1b[31mred\x07\r\n".encode()])
    assert reply.text == "5.1.1 n?h ?[31mred?"
    [invalid], _ = read_all([b"550 bad \xff octet\r\n"])
    assert invalid.text == "bad ? octet"


def test_an_incomplete_reply_waits_and_leaves_what_follows() -> None:
    reader, buffer = ReplyReader(), bytearray(b"250-first\r\n250-sec")
    assert reader.take(buffer) is None
    assert buffer == b"250-sec"  # whole lines are taken; the partial one waits
    buffer += b"ond\r\n250 last\r\n220 next"
    reply = reader.take(buffer)
    assert reply is not None and reply.lines == ["first", "second", "last"]
    assert buffer == b"220 next"


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (b"hello there\r\n", "malformed reply"),
        (b"25\r\n", "malformed reply"),
        (b"150 one-digit class\r\n", "malformed reply"),
        (b"650 not a class\r\n", "malformed reply"),
        (b"2x0 letters\r\n", "malformed reply"),
        (b"250-one\r\n251 another code\r\n", "reply code changed"),
        (b"250-x\r\n" * MAX_REPLY_LINES + b"250 end\r\n", "reply too long"),
        (b"250 " + b"x" * MAX_LINE + b"\r\n", "reply line too long"),
    ],
)
def test_bad_replies_raise(stream: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        read_all([stream])


def test_a_line_too_long_is_refused_before_its_end_arrives() -> None:
    """Memory stays bounded: an unterminated line past the limit is an error at once."""
    with pytest.raises(ValueError, match="reply line too long"):
        read_all([b"250 " + b"x" * MAX_LINE])
    replies, rest = read_all([b"250 " + b"x" * (MAX_LINE - 10)])  # not yet too long: waits
    assert replies == [] and len(rest) == MAX_LINE - 6


@contextlib.contextmanager
def client_over_a_socket_pair() -> Iterator[tuple[asyncio.AbstractEventLoop, socket.socket, Any]]:
    """The relay client's ``Connection`` on one end of a socket pair (a loop of its own), the
    other end for the test to write the next hop's side; closed (by the test's end) after."""
    from farm.relay.client import ClientSettings, Connection, _Protocol
    from farm.relay.routes import Route

    loop = asyncio.new_event_loop()
    ours, theirs = socket.socketpair()
    try:
        protocol = _Protocol(loop)
        loop.run_until_complete(loop.connect_accepted_socket(lambda: protocol, ours))
        connection = Connection(Route("127.0.0.1", 25, False), protocol, ClientSettings())
        yield loop, theirs, connection
        connection.abort()
        loop.run_until_complete(asyncio.wait_for(protocol.closed, 5))
    finally:
        theirs.close()
        loop.close()


def test_a_connection_with_a_half_read_reply_is_not_reused() -> None:
    """A read abandoned mid-reply (a timeout) leaves its first lines in the reader: the
    connection must not go back into use, even though its buffer is empty."""
    with client_over_a_socket_pair() as (loop, theirs, connection):
        assert connection.usable()
        theirs.sendall(b"250-first line\r\n")
        with pytest.raises(TimeoutError):
            loop.run_until_complete(asyncio.wait_for(connection.read_reply(), 0.5))
        assert not connection._protocol.buffer and not connection.usable()


def test_a_connection_whose_reply_went_to_a_cancelled_read_is_not_reused() -> None:
    """A reply handed to a read that is cancelled before it runs again (a hook's timeout, the
    client gone, in the same pass of the loop) is lost with it: the buffer is empty, yet the
    connection must not go back into use."""
    with client_over_a_socket_pair() as (loop, _, connection):
        protocol = connection._protocol

        async def read_then_cancel() -> None:
            read = asyncio.ensure_future(connection.read_reply())
            await asyncio.sleep(0)  # the read now waits for its reply
            protocol.data_received(b"250 ok\r\n")  # it arrives: handed to the read...
            read.cancel()  # ...which is cancelled before it could take it
            with pytest.raises(asyncio.CancelledError):
                await read

        assert connection.usable()
        loop.run_until_complete(asyncio.wait_for(read_then_cancel(), 10))
        assert not protocol.buffer and not connection.usable()
