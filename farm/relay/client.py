"""The relay's SMTP/LMTP client: one connection to a next hop, every step bounded by a timeout.

Written on a plain ``asyncio.Protocol`` (own read buffer) so that it can tell when the next hop
sent bytes nobody asked for: we know how many replies each write asks for (one; two for a
pipelined ``MAIL`` + ``RCPT``, see ``pipeline``), so anything left in the buffer after the last
of them is a protocol error (the connection is closed, never reused), and anything after the
``220`` to our ``STARTTLS`` is a response-injection attempt (the attempt fails with
``451 4.7.5``). Replies are bounded (``farm.relay.reply_reader``): at most 100 lines of at most
4096 bytes each. ``pipelining`` and ``chunking`` tell what the next hop offers (after
``STARTTLS``: what it offered over TLS).

TLS modes: ``none``; ``starttls`` (used when the next hop offers it, else plain);
``required`` (``STARTTLS`` must be offered and succeed); ``implicit`` (TLS from the connect).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from farm.relay.errors import NextHopError, ProtocolError
from farm.relay.reply_reader import NEXT_HOP_LOST, Reply, ReplyReader
from farm.relay.routes import Route

__all__ = [
    "NEXT_HOP_LOST",
    "NEXT_HOP_TIMEOUT",
    "NEXT_HOP_UNAVAILABLE",
    "TLS_FAILED",
    "TLS_MODES",
    "ClientSettings",
    "Connection",
    "NextHopError",
    "ProtocolError",
    "Reply",
    "connect",
    "describe",
    "failure",
    "make_ssl_context",
]

NEXT_HOP_UNAVAILABLE = "451 4.4.1 Next hop unavailable, try again later"
NEXT_HOP_TIMEOUT = "451 4.4.2 Next hop timed out, try again later"
TLS_FAILED = "451 4.7.5 TLS with next hop failed, try again later"

TLS_MODES = ("none", "starttls", "required", "implicit")
#: ``send_all`` gathers chunks into writes of this many octets (one syscall each, not one per
#: chunk: a small message's command, content and final CRLF go in one).
WRITE_SIZE = 64 * 1024
#: Reading pauses while this much unread data is buffered.
_HIGH_WATER = 64 * 1024


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How to talk to next hops: the per-step ``timeout`` and the TLS policy."""

    timeout: float = 60.0
    tls: str = "none"
    ssl_context: ssl.SSLContext | None = None
    tls_server_name: str | None = None

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"bad tls {self.tls!r}: expected one of {', '.join(TLS_MODES)}")
        if self.tls != "none" and self.ssl_context is None:
            raise ValueError(f"tls={self.tls!r} needs an SSL context")


def make_ssl_context(verify: bool = True, ca_file: str | None = None) -> ssl.SSLContext:
    """A client context: certificate and host name checked (against ``ca_file`` if given)."""
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def describe(error: BaseException) -> str:
    """One line about a failure (no traceback)."""
    text = " ".join(str(error).split())[:300]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def failure(error: BaseException) -> NextHopError:
    """The ``NextHopError`` for an error raised by a ``Connection`` in use."""
    if isinstance(error, NextHopError):
        return error
    if isinstance(error, TimeoutError):
        return NextHopError(NEXT_HOP_TIMEOUT, "timed out")
    if isinstance(error, ssl.SSLError):
        return NextHopError(TLS_FAILED, describe(error))
    return NextHopError(NEXT_HOP_LOST, describe(error))


class _Protocol(asyncio.Protocol):
    """Buffers what the next hop sends; flow control both ways."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.replies = ReplyReader()
        self.eof = False
        #: A reply was taken off the buffer for a read that was cancelled before it could
        #: have it: where the dialogue stands is unknown (never reused).
        self.reply_lost = False
        self.closed: asyncio.Future[None] = loop.create_future()
        #: The reader's wait for a whole reply (see ``next_reply``).
        self._waiter: asyncio.Future[Reply] | None = None
        #: The reply waits' timer (see ``next_reply``) and the deadline of the wait running.
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._drain: asyncio.Future[None] | None = None
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        if self._waiter is not None:
            self._deliver()

    def eof_received(self) -> bool:
        self.eof = True
        self._deliver()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._deliver()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _deliver(self) -> None:
        """A reader waits (:meth:`next_reply`): give it the next whole reply, or the error
        that ends its wait (a malformed reply, the next hop gone), once there is one."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        try:
            reply = self.take_reply()
        except Exception as error:  # ProtocolError, ConnectionResetError
            waiter.set_exception(error)
            return
        if reply is not None:
            waiter.set_result(reply)

    def must_drain(self) -> bool:
        """True when a writer has to wait (the peer is not keeping up) or fail (closed)."""
        return (self._drain is not None and not self._drain.done()) or self.closed.done()

    async def drain(self) -> None:
        if self._drain is not None and not self._drain.done():
            await self._drain
        if self.closed.done():
            raise ConnectionResetError("next hop closed the connection")

    def take_reply(self) -> Reply | None:
        """The next whole reply off the buffer; None when the caller has to wait for more."""
        try:
            reply = self.replies.take(self.buffer)
        except ValueError as error:
            raise ProtocolError(str(error)) from None
        if self._reading_paused and len(self.buffer) < _HIGH_WATER // 2 and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        if reply is None and self.eof:
            raise ConnectionResetError("next hop closed the connection")
        return reply

    def next_reply(self, deadline: float) -> asyncio.Future[Reply]:
        """The next whole reply (none is buffered now), as it arrives; TimeoutError at
        ``deadline`` (loop time). The reply is taken off the buffer only while the waiter is
        pending (a reader cancelled after that loses it: see ``reply_lost``).

        Per reply, so no timer per wait: one timer per connection, armed for the earliest
        deadline, checks when it fires whether the wait then running is past its own deadline
        (and is armed again for it if not)."""
        waiter: asyncio.Future[Reply] = self.loop.create_future()
        self._waiter = waiter
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._check_deadline)
        return waiter

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nothing waits: the next wait arms the timer again
        # (a timer fires up to a millisecond early under uvloop: due, not armed again)
        if self.loop.time() >= self._deadline - 0.001:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)


class Connection:
    """An open session with a next hop (greeted, ``EHLO``/``LHLO`` done, TLS as configured)."""

    def __init__(self, route: Route, protocol: _Protocol, settings: ClientSettings) -> None:
        self.route = route
        self.settings = settings
        self.timeout = settings.timeout
        self._protocol = protocol
        self.extensions: set[str] = set()
        self.tls = False
        #: Transactions started on this connection (``MAIL`` accepted).
        self.transactions = 0
        self.loop = protocol.loop
        #: The pool's idle-timeout callback while the connection is idle.
        self.idle_handle: asyncio.TimerHandle | None = None

    @property
    def transport(self) -> asyncio.Transport:
        transport = self._protocol.transport
        if transport is None:
            raise ConnectionResetError("not connected")
        return transport

    def usable(self) -> bool:
        """Still open, with nothing unsolicited buffered (an idle next hop's ``421``, an EOF)
        and no reply left half read (its first lines taken by a read that was abandoned) or
        taken for a read cancelled before it had it."""
        protocol = self._protocol
        transport = protocol.transport
        return (
            transport is not None
            and not transport.is_closing()
            and not protocol.eof
            and not protocol.buffer
            and not protocol.replies.lines
            and not protocol.reply_lost
        )

    # -- protocol ------------------------------------------------------------------------------

    @property
    def pipelining(self) -> bool:
        """The next hop offers ``PIPELINING`` (RFC 2920)."""
        return "PIPELINING" in self.extensions

    @property
    def chunking(self) -> bool:
        """The next hop offers ``CHUNKING`` (RFC 3030: ``BDAT``)."""
        return "CHUNKING" in self.extensions

    async def read_reply(self, *, final: bool = True) -> Reply:
        """The next reply, whole within ``timeout``. ``final``: nothing may follow it (no
        other reply is awaited)."""
        protocol = self._protocol
        # (with nothing buffered, no reply can be whole yet: wait at once)
        reply = protocol.take_reply() if protocol.buffer or protocol.eof else None
        if reply is None:
            waiter = protocol.next_reply(self.loop.time() + self.timeout)
            try:
                reply = await waiter
            except asyncio.CancelledError:
                if not waiter.cancelled():  # it had its reply (or error) already: lost
                    protocol.reply_lost = True
                raise
        if final and protocol.buffer:
            raise ProtocolError("unsolicited data after a reply")
        return reply

    def write(self, data: bytes) -> bool:
        """Write ``data``; True when the caller must then await :meth:`drain` (the peer is
        not keeping up, or the connection closed)."""
        protocol = self._protocol
        if protocol.buffer:
            raise ProtocolError("unsolicited data from the next hop")
        transport = protocol.transport
        if protocol.eof or transport is None:
            raise ConnectionResetError("next hop closed the connection")
        transport.write(data)
        return protocol.must_drain()

    async def drain(self) -> None:
        """Until the peer has taken what was written (bounded by ``timeout``)."""
        async with asyncio.timeout(self.timeout):
            await self._protocol.drain()

    async def send(self, data: bytes) -> None:
        """Write ``data`` (bounded wait for the peer to take it)."""
        if self.write(data):
            await self.drain()

    def command(
        self, line: str, *, utf8: bool = False, final: bool = True
    ) -> Coroutine[Any, Any, Reply]:
        """Send one command line; its reply, to be awaited. CR, LF and NUL are never sent
        (ProtocolError, as a closed connection's ConnectionResetError, raised at once)."""
        return self._reply_to(_encode(line, utf8), final)

    def pipeline(self, lines: list[str], *, utf8: bool = False) -> Coroutine[Any, Any, Reply]:
        """Send several command lines in one write (the next hop offers ``PIPELINING``); the
        first one's reply, to be awaited. The caller reads one more reply per further line
        (``read_reply``), the last with ``final=True``."""
        return self._reply_to(b"".join([_encode(line, utf8) for line in lines]), False)

    def _reply_to(self, data: bytes, final: bool) -> Coroutine[Any, Any, Reply]:
        # (a plain function: the reply's read is the only coroutine when no drain is needed)
        if self.write(data):
            return self._drain_then_read(final)
        return self.read_reply(final=final)

    async def _drain_then_read(self, final: bool) -> Reply:
        await self.drain()
        return await self.read_reply(final=final)

    async def bdat_last(self, size: int, chunks: Iterable[bytes]) -> None:
        """Send ``BDAT <size> LAST`` and the ``chunks`` (exactly ``size`` octets, no
        dot-stuffing), the command in the first chunk's write; the caller reads the reply
        (LMTP: one per recipient). A mismatched size is a ProtocolError (closed, never reused)."""
        sent = await self.send_all(chunks, first=b"BDAT %d LAST\r\n" % size)
        if sent != size:
            raise ProtocolError(f"BDAT declared {size} octets, {sent} were sent")

    async def send_all(self, chunks: Iterable[bytes], first: bytes = b"") -> int:
        """Send ``first`` and the ``chunks``, gathered into writes of about ``WRITE_SIZE``
        octets (a small message is one write, command included), each with a bounded wait for
        the peer to take it (a large body is never buffered whole); the octets of ``chunks``
        sent."""
        sent = 0
        pending = [first] if first else []
        held = len(first)
        for chunk in chunks:
            sent += len(chunk)
            pending.append(chunk)
            held += len(chunk)
            if held >= WRITE_SIZE:
                await self.send(b"".join(pending))
                pending.clear()
                held = 0
        if pending:
            await self.send(pending[0] if len(pending) == 1 else b"".join(pending))
        return sent

    async def hello(self, name: str) -> Reply:
        """``LHLO`` (LMTP) or ``EHLO``, falling back to ``HELO``; records the extensions."""
        lmtp = self.route.lmtp
        reply = await self.command(f"{'LHLO' if lmtp else 'EHLO'} {name}")
        if not reply.ok and not lmtp and 500 <= reply.code <= 599:
            reply = await self.command(f"HELO {name}")
            self.extensions = set()
            return reply
        if reply.ok:
            # The first line is the server's name; the rest start with an extension keyword.
            self.extensions = {line.split(" ", 1)[0].upper() for line in reply.lines[1:] if line}
        return reply

    async def open(self, name: str) -> None:
        """Greeting, hello, and ``STARTTLS`` when the TLS mode asks for it."""
        greeting = await self.read_reply()
        if greeting.code != 220:
            raise NextHopError(NEXT_HOP_UNAVAILABLE, f"greeting {greeting!r}")
        hello = await self.hello(name)
        if not hello.ok:
            raise NextHopError(NEXT_HOP_UNAVAILABLE, f"hello refused {hello!r}")
        mode = self.settings.tls
        if mode not in ("starttls", "required") or self.tls:
            return
        if "STARTTLS" not in self.extensions:
            if mode == "required":
                raise NextHopError(TLS_FAILED, "STARTTLS not offered")
            return
        reply = await self.command("STARTTLS", final=False)
        if reply.code != 220:
            if mode == "required":
                raise NextHopError(TLS_FAILED, f"STARTTLS refused {reply!r}")
            if self._protocol.buffer:
                raise ProtocolError("unsolicited data after a reply")
            return
        if self._protocol.buffer:
            # Bytes sent before the handshake would be read as if they came over TLS.
            raise NextHopError(TLS_FAILED, "response injection: data after the STARTTLS reply")
        await self._start_tls()
        hello = await self.hello(name)
        if not hello.ok:
            raise NextHopError(NEXT_HOP_UNAVAILABLE, f"hello after STARTTLS refused {hello!r}")

    async def _start_tls(self) -> None:
        settings = self.settings
        assert settings.ssl_context is not None
        try:
            async with asyncio.timeout(self.timeout):
                transport = await self.loop.start_tls(
                    self.transport,
                    self._protocol,
                    settings.ssl_context,
                    server_hostname=settings.tls_server_name or self.route.host,
                    ssl_handshake_timeout=self.timeout,
                )
        except TimeoutError:
            raise NextHopError(TLS_FAILED, "TLS handshake timed out") from None
        except (ssl.SSLError, ssl.CertificateError, OSError) as error:
            raise NextHopError(TLS_FAILED, describe(error)) from None
        if transport is None:
            raise NextHopError(TLS_FAILED, "TLS handshake failed")
        self._protocol.transport = transport
        self.tls = True

    # -- closing -------------------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection now (its state is unknown)."""
        transport = self._protocol.transport
        if transport is not None:
            transport.abort()

    async def aclose(self) -> None:
        """``QUIT`` without waiting for the reply, close, wait (bounded) until closed."""
        transport = self._protocol.transport
        if transport is None:
            return
        if not transport.is_closing():
            with contextlib.suppress(Exception):
                transport.write(b"QUIT\r\n")
            transport.close()
        try:
            async with asyncio.timeout(min(self.timeout, 2.0)):
                await asyncio.shield(self._protocol.closed)
        except TimeoutError:
            transport.abort()


def _encode(line: str, utf8: bool) -> bytes:
    """One command line, CRLF-terminated; CR, LF and NUL in it are refused."""
    if "\r" in line or "\n" in line or "\x00" in line:
        raise ProtocolError("refusing to send a command with CR, LF or NUL")
    return line.encode("utf-8" if utf8 else "ascii", "surrogateescape") + b"\r\n"


async def connect(route: Route, settings: ClientSettings, name: str) -> Connection:
    """A ready ``Connection`` to ``route``; ``NextHopError`` when it cannot be had."""
    loop = asyncio.get_running_loop()
    protocol = _Protocol(loop)
    implicit = settings.tls == "implicit"
    try:
        async with asyncio.timeout(settings.timeout):
            await loop.create_connection(
                lambda: protocol,
                route.host,
                route.port,
                ssl=settings.ssl_context if implicit else None,
                server_hostname=(settings.tls_server_name or route.host) if implicit else None,
                ssl_handshake_timeout=settings.timeout if implicit else None,
            )
    except TimeoutError:
        raise NextHopError(NEXT_HOP_TIMEOUT, "connect timed out") from None
    except (ssl.SSLError, ssl.CertificateError) as error:
        raise NextHopError(TLS_FAILED, describe(error)) from None
    except OSError as error:
        raise NextHopError(NEXT_HOP_UNAVAILABLE, describe(error)) from None
    connection = Connection(route, protocol, settings)
    connection.tls = implicit
    try:
        await connection.open(name)
    except BaseException as error:
        connection.abort()
        if isinstance(error, Exception):
            raise failure(error) from None
        raise
    return connection
