"""Ready-made handlers with the public behaviour of ``aiosmtpd.handlers`` (aiosmtpd 1.4).

``Debugging`` prints each message, ``Sink`` discards everything, ``Message``/``AsyncMessage``
hand an :class:`email.message.Message` to a subclass, ``Mailbox`` stores into a Maildir and
``Proxy`` relays to another SMTP server. Where aiosmtpd loses mail silently, ``Proxy`` does not:
its reply is ``250`` only when the upstream accepted the message for at least one recipient.
"""

from __future__ import annotations

import asyncio
import email.message
import functools
import logging
import mailbox
import os
import smtplib
import sys
import time
import warnings
from abc import ABCMeta, abstractmethod
from argparse import ArgumentParser
from email.parser import BytesParser, Parser
from typing import Any, Self, TextIO

from farm.relay import clean_content

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


def _reply_text(raw: bytes | str, default: str) -> str:
    """An upstream's reply text as one line (smtplib joins multi-line replies with LF)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text or default


def _passthrough(code: int, raw: bytes | str) -> str:
    """Our reply for an upstream's refusal ``code``: its code and text, kept transient if 4xx."""
    if not 400 <= code <= 599:
        return UPSTREAM_LOST
    if code == 421:  # the upstream is closing; for our client this is just "try again later"
        code = 451
    return f"{code} {_reply_text(raw, 'Requested action not taken')}"


def _refused_reply(recipients: dict[str, tuple[int, bytes]]) -> str:
    """Our reply when the upstream refused every recipient: a temporary refusal wins."""
    refusals = list(recipients.values())
    for code, text in refusals:
        if 400 <= code <= 499:
            return _passthrough(code, text)
    code, text = refusals[0] if refusals else (-1, b"")
    return _passthrough(code, text)


class Proxy:
    """Relay each message, with an ``X-Peer`` header added, to ``remote_hostname:remote_port``.

    The relay is synchronous ``smtplib`` run in the loop's default executor, so the event loop
    keeps serving other sessions meanwhile. The reply to the client is ``250 OK`` when the
    upstream accepted at least one recipient (refused ones are logged); otherwise the
    upstream's own refusal (``4xx``/``5xx``), or ``451 4.4.x`` when it could not be reached or
    the connection failed. ``timeout`` bounds each network operation with the upstream.
    Stray CR, LF and NUL in the content become spaces, as ``farm.relay`` does: smtplib
    dot-stuffs only after LF, so a bare ``<CR>.<CR>`` must never reach the upstream.
    """

    def __init__(
        self, remote_hostname: str, remote_port: int, *, timeout: float | None = 300.0
    ) -> None:
        self._hostname = remote_hostname
        self._port = remote_port
        self._timeout = timeout

    async def handle_DATA(self, server: Server, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        if isinstance(content, str):
            content = envelope.original_content
        # smtplib dot-stuffs only after LF: stray CR/LF/NUL must not reach the upstream.
        data = _with_peer_header(clean_content(bytes(content)), session.peer)
        options = []
        if getattr(envelope, "smtp_utf8", False):
            options.append("SMTPUTF8")
        if "BODY=8BITMIME" in envelope.mail_options:
            options.append("BODY=8BITMIME")
        relay = functools.partial(
            self._relay,
            envelope.mail_from,
            list(envelope.rcpt_tos),
            data,
            options,
            getattr(server, "hostname", None),
        )
        started = time.monotonic()
        reply, refused, error = await asyncio.get_running_loop().run_in_executor(None, relay)
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

    def _relay(
        self,
        mail_from: str,
        rcpt_tos: list[str],
        data: bytes,
        options: list[str],
        local_hostname: str | None,
    ) -> tuple[str, dict[str, tuple[int, bytes]], str]:
        """Deliver (blocking; runs in a worker thread): ``(reply, refused, error detail)``."""
        try:
            client = smtplib.SMTP(
                self._hostname, self._port, local_hostname=local_hostname, timeout=self._timeout
            )
        except (OSError, smtplib.SMTPException) as error:  # refused, unresolvable, bad greeting
            return UPSTREAM_UNAVAILABLE, {}, _describe(error)
        try:
            client.ehlo_or_helo_if_needed()
            wanted = {"SMTPUTF8": "smtputf8", "BODY=8BITMIME": "8bitmime"}
            usable = [o for o in options if client.has_extn(wanted[o])]
            refused = client.sendmail(mail_from, rcpt_tos, data, usable)
        except smtplib.SMTPRecipientsRefused as error:
            return _refused_reply(error.recipients), error.recipients, "all recipients refused"
        except smtplib.SMTPHeloError as error:
            return UPSTREAM_UNAVAILABLE, {}, _describe(error)
        except smtplib.SMTPResponseException as error:  # sender refused, data refused
            return _passthrough(error.smtp_code, error.smtp_error), {}, _describe(error)
        except UnicodeEncodeError as error:  # an 8-bit address and no SMTPUTF8 upstream
            return NO_SMTPUTF8, {}, _describe(error)
        except (OSError, smtplib.SMTPException) as error:  # disconnected, timed out, reset
            return UPSTREAM_LOST, {}, _describe(error)
        finally:
            _quit(client)
        return "250 OK", refused, ""


def _quit(client: smtplib.SMTP) -> None:
    """Say goodbye if the connection still works; close it in any case."""
    try:
        if client.sock is not None:
            client.quit()
    except (OSError, smtplib.SMTPException):
        pass
    finally:
        client.close()


def _describe(error: BaseException) -> str:
    """One line about a relay failure (no traceback)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
