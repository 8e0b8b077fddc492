"""Replies held for the end of the event loop's pass (farm.smtp.write_batch): the sessions of
one server write theirs back to back, each in order, and nothing is held past a close or a
STARTTLS (real sockets for the last two; a recording transport to see when writes happen)."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from typing import Any

from farm.handlers import Sink
from farm.smtp import SMTP
from tests.support.serving import serve_blocking
from tests.support.wait import WAIT


class RecordingTransport(asyncio.Transport):
    """Keeps every write (and whether the transport was closed before it)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed_before_write = False
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.7", 40000), "sockname": ("192.0.2.25", 25)}.get(name, default)

    def write(self, data: Any) -> None:
        self.closed_before_write |= self.closing
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0


def _sessions(count: int) -> tuple[list[SMTP], list[RecordingTransport]]:
    factory = SMTP.protocol_factory(Sink(), hostname="farm.test", loop=asyncio.get_running_loop())
    protocols, transports = [factory() for _ in range(count)], []
    for protocol in protocols:
        transports.append(RecordingTransport())
        protocol.connection_made(transports[-1])
    return protocols, transports


async def _end_of_pass() -> None:
    await asyncio.sleep(0)


def test_replies_of_one_pass_are_written_together_at_its_end() -> None:
    async def scenario() -> None:
        protocols, transports = _sessions(3)
        await _end_of_pass()  # the greetings
        assert [t.writes for t in transports] == [
            [b"220 farm.test " + _ident(p)] for p in protocols
        ]
        for protocol in protocols:
            protocol.data_received(b"HELO client.test\r\n")
        assert all(len(t.writes) == 1 for t in transports)  # held so far
        await _end_of_pass()
        assert [t.writes[1:] for t in transports] == [[b"250 farm.test\r\n"]] * 3

    asyncio.run(scenario())


def test_a_second_flush_in_one_pass_writes_both_in_order() -> None:
    async def scenario() -> None:
        (protocol,), (transport,) = _sessions(1)
        await _end_of_pass()
        protocol.data_received(b"HELO client.test\r\n")
        protocol.data_received(b"NOOP\r\n")  # (uvloop may hand over two reads in one pass)
        assert transport.writes[1:] == [b"250 farm.test\r\n250 OK\r\n"]  # one write, now
        await _end_of_pass()
        assert len(transport.writes) == 2  # nothing left to write twice

    asyncio.run(scenario())


def test_quit_writes_what_was_held_then_its_221_then_closes() -> None:
    async def scenario() -> None:
        (protocol,), (transport,) = _sessions(1)
        await _end_of_pass()
        protocol.data_received(b"HELO client.test\r\n")
        protocol.data_received(b"QUIT\r\n")
        assert b"".join(transport.writes[1:]) == b"250 farm.test\r\n221 Bye\r\n"
        assert transport.closing and not transport.closed_before_write

    asyncio.run(scenario())


def test_pipelined_sessions_over_real_sockets_get_every_reply_in_order() -> None:
    """Several clients at once on one factory's server: each gets its own replies, in order."""
    factory = SMTP.protocol_factory(Sink(), hostname="farm.test")
    messages = 20

    def client(port: int) -> list[int]:
        codes = []
        with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as smtp:
            smtp.ehlo("client.test")
            for n in range(messages):
                smtp.sendmail("a@client.test", [f"r{n}@farm.test"], b"Subject: x\r\n\r\nbody\r\n")
                codes.append(smtp.noop()[0])
        return codes

    assert serve_blocking(factory, *[client] * 6) == [[250] * messages] * 6


def test_starttls_on_a_factory_server(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """The 220 to STARTTLS goes out in the clear before the handshake (never held for later)."""
    factory = SMTP.protocol_factory(Sink(), hostname="farm.test", tls_context=server_context)

    def client(port: int) -> tuple[int, int]:
        with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as smtp:
            smtp.ehlo("client.test")
            code = smtp.starttls(context=client_context)[0]
            smtp.ehlo("client.test")
            refused = smtp.sendmail("a@client.test", ["r@farm.test"], b"Subject: x\r\n\r\nbody\r\n")
            return code, len(refused)

    assert serve_blocking(factory, client) == [(220, 0)]


def _ident(protocol: SMTP) -> bytes:
    return f"{protocol.__ident__}\r\n".encode()
