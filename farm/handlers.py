"""Ready-made handlers with the public behaviour of ``aiosmtpd.handlers`` (aiosmtpd 1.4).

``Debugging`` prints each message, ``Sink`` discards everything, ``Message``/``AsyncMessage``
hand an :class:`email.message.Message` to a subclass, ``Mailbox`` stores into a Maildir and
``Proxy`` relays to another SMTP server. Where aiosmtpd loses mail silently, ``Proxy`` does not:
its reply is ``250`` only when the upstream accepted the message for at least one recipient.
"""

from __future__ import annotations

import asyncio
import email.message
import logging
import mailbox
import os
import socket
import sys
import time
import warnings
from abc import ABCMeta, abstractmethod
from argparse import ArgumentParser
from email.parser import BytesParser, Parser
from typing import Any, Self, TextIO

from farm.relay.client import (
    ClientSettings,
    Connection,
    NextHopError,
    Reply,
    connect,
    describe,
)
from farm.relay.content import clean_content, dot_stuff
from farm.relay.routes import Route

__all__ = ["AsyncMessage", "Debugging", "Mailbox", "Message", "Proxy", "Sink"]

log = logging.getLogger("farm.handlers")

#: What the engine passes as ``server``, ``session`` and ``envelope`` (``farm.smtp`` types, or
#: anything with the same attributes).
Server = Any
Session = Any
Envelope = Any


def _peer_header(peer: Any) -> str:
    """The ``X-Peer`` line ``Debugging`` prints: the repr of the whole peer address."""
    return f"X-Peer: {peer!r}"


class Debugging:
    """Print every message, with its ``X-Peer``, to ``stream`` (default: ``sys.stdout``)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream: TextIO = sys.stdout if stream is None else stream

    @classmethod
    def from_cli(cls, parser: ArgumentParser, *args: str) -> Self:
        """Build from command-line arguments: nothing, ``stdout`` or ``stderr``."""
        streams = {"stdout": sys.stdout, "stderr": sys.stderr}
        if len(args) > 1 or (args and args[0] not in streams):
            parser.error("Debugging usage: [stdout|stderr]")
        return cls(streams[args[0]] if args else None)

    async def handle_DATA(self, server: Server, session: Session, envelope: Envelope) -> str:
        out = self.stream
        print("---------- MESSAGE FOLLOWS ----------", file=out)
        separate = False
        if envelope.mail_options:
            print("mail options:", envelope.mail_options, file=out)
            separate = True
        if any(envelope.rcpt_options):
            print("rcpt options:", envelope.rcpt_options, file=out)
            separate = True
        if separate:
            print(file=out)
        self._print_content(session.peer, envelope.content)
        print("------------ END MESSAGE ------------", file=out)
        return "250 OK"

    def _print_content(self, peer: Any, content: bytes | str) -> None:
        out = self.stream
        in_headers = True
        for line in content.splitlines():
            if in_headers and not line:
                # The blank line that ends the headers: the peer goes in as one more header.
                print(_peer_header(peer), file=out)
                in_headers = False
            if isinstance(line, bytes):
                line = line.decode("utf-8", "replace")
            print(line, file=out)


class Sink:
    """Accept every message and discard it.

    It has no hooks at all, so the engine answers every command itself, on its fast path.
    """

    @classmethod
    def from_cli(cls, parser: ArgumentParser, *args: str) -> Self:
        """Build from command-line arguments (there are none)."""
        if args:
            parser.error("Sink handler does not accept arguments")
        return cls()


class MessageBase(metaclass=ABCMeta):
    """Shared part of ``Message`` and ``AsyncMessage``: parse the content into a message."""

    def __init__(self, message_class: type[email.message.Message] | None = None) -> None:
        self.message_class = message_class

    def prepare_message(self, session: Session, envelope: Envelope) -> email.message.Message:
        """Parse ``envelope.content``; add ``X-Peer``, ``X-MailFrom`` and ``X-RcptTo`` headers."""
        content = envelope.content
        message: email.message.Message
        if isinstance(content, bytes | bytearray):
            message = BytesParser(self.message_class).parsebytes(bytes(content))
        elif isinstance(content, str):
            message = Parser(self.message_class).parsestr(content)
        else:
            raise TypeError(f"Expected str or bytes, got {type(content)}")
        message["X-Peer"] = str(session.peer)
        message["X-MailFrom"] = envelope.mail_from
        message["X-RcptTo"] = ", ".join(envelope.rcpt_tos)
        return message

    @abstractmethod
    async def handle_DATA(self, server: Server, session: Session, envelope: Envelope) -> str:
        """Deliver the message; return the reply."""


class Message(MessageBase):
    """Abstract: hand each message to :meth:`handle_message` (synchronous)."""

    async def handle_DATA(self, server: Server, session: Session, envelope: Envelope) -> str:
        self.handle_message(self.prepare_message(session, envelope))
        return "250 OK"

    @abstractmethod
    def handle_message(self, message: email.message.Message) -> None:
        """Do something with one received message."""


class AsyncMessage(MessageBase):
    """Abstract: hand each message to the coroutine :meth:`handle_message`.

    ``loop`` is kept for aiosmtpd compatibility; without one, ``self.loop`` is the running loop
    (aiosmtpd instead fixes, and may create, a loop when the handler is constructed).
    """

    def __init__(
        self,
        message_class: type[email.message.Message] | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(message_class)
        self._loop = loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop given to the constructor, else the running loop, else the thread's loop."""
        if self._loop is not None:
            return self._loop
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            pass
        self._loop = _thread_event_loop()
        return self._loop

    @loop.setter
    def loop(self, value: asyncio.AbstractEventLoop | None) -> None:
        self._loop = value

    async def handle_DATA(self, server: Server, session: Session, envelope: Envelope) -> str:
        await self.handle_message(self.prepare_message(session, envelope))
        return "250 OK"

    @abstractmethod
    async def handle_message(self, message: email.message.Message) -> None:
        """Do something with one received message."""


def _thread_event_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop, made (and set) if there is none, as aiosmtpd does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            pass
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


class Mailbox(Message):
    """Store every message in the Maildir ``mail_dir`` (created if missing)."""

    def __init__(
        self,
        mail_dir: str | os.PathLike[str],
        message_class: type[email.message.Message] | None = None,
    ) -> None:
        self.mailbox = mailbox.Maildir(mail_dir)
        self.mail_dir = mail_dir
        super().__init__(message_class)

    def handle_message(self, message: email.message.Message) -> None:
        self.mailbox.add(message)

    def reset(self) -> None:
        """Delete every stored message."""
        self.mailbox.clear()

    @classmethod
    def from_cli(cls, parser: ArgumentParser, *args: str) -> Self:
        """Build from command-line arguments: exactly one, the Maildir path."""
        if not args:
            parser.error("The directory for the maildir is required")
        elif len(args) > 1:
            parser.error("Too many arguments for Mailbox handler")
        return cls(args[0])


# -- Proxy -----------------------------------------------------------------------------------

UPSTREAM_UNAVAILABLE = "451 4.4.1 Upstream server unavailable, try again later"
UPSTREAM_LOST = "451 4.4.2 Connection to upstream server lost, try again later"
NO_SMTPUTF8 = "553 5.6.7 Upstream server does not support SMTPUTF8"
#: ``MAIL FROM`` parameters a client declared that go upstream, and the extension they need.
_FORWARDED = {"SMTPUTF8": "SMTPUTF8", "BODY=8BITMIME": "8BITMIME"}
#: ``timeout=None`` (no bound, as smtplib's): each step may take this long (a year).
_UNBOUNDED = 365 * 86400.0


def _with_peer_header(content: bytes, peer: Any) -> bytes:
    """``content`` with an ``X-Peer: <peer host>`` header line added, as aiosmtpd's Proxy does.

    The line goes right before the blank line that ends the headers, with that line's ending.
    Content without a blank line is all headers (or headerless): the line goes first, where it
    cannot split a folded header.
    """
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    header = b"X-Peer: " + str(host).encode("ascii", "backslashreplace")
    lines = content.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line in (b"\r\n", b"\n", b"\r"):
            lines.insert(i, header + line)
            return b"".join(lines)
    return header + b"\r\n" + content


def _passthrough(reply: Reply) -> str:
    """Our reply for an upstream's refusal: its code and text, ``421`` made ``451``; a reply
    that is no refusal (not 4xx/5xx) where one was expected means the exchange broke."""
    return reply.passthrough() if 400 <= reply.code <= 599 else UPSTREAM_LOST


def _refused_reply(refused: dict[str, Reply]) -> str:
    """Our reply when the upstream refused every recipient: a temporary refusal wins."""
    for reply in refused.values():
        if 400 <= reply.code <= 499:
            return _passthrough(reply)
    return next((_passthrough(reply) for reply in refused.values()), UPSTREAM_LOST)


class Proxy:
    """Relay each message, with an ``X-Peer`` header added, to ``remote_hostname:remote_port``.

    The upstream is reached with the relay's asyncio next-hop client (``farm.relay.client``),
    one connection per message, so the event loop keeps serving other sessions meanwhile. The
    reply to the client is ``250 OK`` when the upstream accepted the message for at least one
    recipient (refused ones are logged); otherwise the upstream's own refusal (``4xx``/``5xx``;
    of several refused recipients a temporary refusal wins), or ``451 4.4.x`` when it could not
    be reached or the connection failed. ``timeout`` bounds each step with the upstream
    (connect, each reply, each write); None: no bound. Stray CR, LF and NUL in the content
    become spaces, as ``farm.relay`` does: dot-stuffing doubles a dot only after CRLF, so a
    bare ``<CR>.<CR>`` must never reach the upstream.
    """

    def __init__(
        self, remote_hostname: str, remote_port: int, *, timeout: float | None = 300.0
    ) -> None:
        self._hostname = remote_hostname
        self._port = remote_port
        self._timeout = timeout
        self._route = Route(remote_hostname, int(remote_port))
        self._settings = ClientSettings(_UNBOUNDED if timeout is None else float(timeout))

    async def handle_DATA(self, server: Server, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        if isinstance(content, str):
            content = envelope.original_content
        # Dot-stuffing follows CRLF only: stray CR/LF/NUL must not reach the upstream.
        data = _with_peer_header(clean_content(bytes(content)), session.peer)
        options = []
        if getattr(envelope, "smtp_utf8", False):
            options.append("SMTPUTF8")
        if "BODY=8BITMIME" in envelope.mail_options:
            options.append("BODY=8BITMIME")
        name = getattr(server, "hostname", None) or socket.getfqdn()
        started = time.monotonic()
        reply, refused, error = await self._deliver(
            envelope.mail_from, list(envelope.rcpt_tos), data, options, name
        )
        log.log(
            logging.INFO if reply.startswith("2") else logging.WARNING,
            "session=%s relay upstream=%s:%s rcpts=%d refused=%d size=%d outcome=%s "
            "duration=%.3fs%s",
            getattr(session, "id", "") or "-",
            self._hostname,
            self._port,
            len(envelope.rcpt_tos),
            len(refused),
            len(data),
            reply[:3],
            time.monotonic() - started,
            f" error={error}" if error else "",
        )
        return reply

    async def _deliver(
        self, mail_from: str, rcpt_tos: list[str], data: bytes, options: list[str], name: str
    ) -> tuple[str, dict[str, Reply], str]:
        """Deliver over a new connection: ``(reply, refused recipients, error detail)``."""
        try:
            connection = await connect(self._route, self._settings, name)
        except NextHopError as error:  # refused, unresolvable, timed out, bad greeting or hello
            return UPSTREAM_UNAVAILABLE, {}, str(error)
        try:
            result = await self._transaction(connection, mail_from, rcpt_tos, data, options)
        except (OSError, ValueError) as error:  # closed, reset, timed out, broke the protocol
            connection.abort()
            return UPSTREAM_LOST, {}, describe(error)
        except BaseException:  # cancelled (the client left, a hook timeout)
            connection.abort()
            raise
        await connection.aclose()
        return result

    async def _transaction(
        self,
        connection: Connection,
        mail_from: str,
        rcpt_tos: list[str],
        data: bytes,
        options: list[str],
    ) -> tuple[str, dict[str, Reply], str]:
        """``MAIL``, one ``RCPT`` per recipient, ``DATA`` and the content, as smtplib's
        ``sendmail`` does (``SIZE`` declared when offered)."""
        params = [option for option in options if _FORWARDED[option] in connection.extensions]
        utf8 = "SMTPUTF8" in params
        if not utf8 and not (mail_from.isascii() and all(r.isascii() for r in rcpt_tos)):
            return NO_SMTPUTF8, {}, "8-bit address, no SMTPUTF8 upstream"
        if "SIZE" in connection.extensions:
            params.append(f"SIZE={len(data)}")
        reply = await connection.command(" ".join([f"MAIL FROM:<{mail_from}>", *params]), utf8=utf8)
        if not reply.ok:
            return _passthrough(reply), {}, f"sender refused: {reply!r}"
        refused: dict[str, Reply] = {}
        for rcpt in rcpt_tos:
            reply = await connection.command(f"RCPT TO:<{rcpt}>", utf8=utf8)
            if not reply.ok:
                refused[rcpt] = reply
                if reply.code == 421:  # the upstream is closing: nothing more goes through
                    return _refused_reply(refused), refused, f"recipient refused: {reply!r}"
        if len(refused) == len(rcpt_tos):
            return _refused_reply(refused), refused, "all recipients refused"
        reply = await connection.command("DATA")
        if reply.code != 354:
            return _passthrough(reply), refused, f"DATA refused: {reply!r}"
        await connection.send(dot_stuff(data))
        reply = await connection.read_reply()
        if not reply.ok:
            return _passthrough(reply), refused, f"message refused: {reply!r}"
        return "250 OK", refused, ""
