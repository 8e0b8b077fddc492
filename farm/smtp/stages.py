"""Checks the engine runs around the handler's hooks: connection screening, SPF at MAIL, the
end-of-data checks (DKIM/ARC/DMARC, a content scanner), each a :class:`Stage`.

A stage overrides the methods it needs; the engine calls, for every stage in order:

* ``connect(session)`` when the connection is accepted (after the PROXY header and the
  per-IP limiter, before ``greeting_delay``): start background work, return at once;
* ``greet(session)`` when the greeting is due: a reply refuses the connection instead of
  the 220 (then it is closed), None lets the greeting go;
* ``mail(session, envelope, address)`` and ``rcpt(session, envelope, address)`` before the
  handler's hook: a reply refuses the command, None lets it go on;
* ``end_of_data(session, envelope)`` once the message is complete (after DATA or the last
  BDAT), before ``handle_DATA``: an :class:`EndOfData` that may edit the header or end the
  transaction with a 4xx/5xx reply (later stages and the handler then do not run);
* ``close(session)`` when the connection is gone (cancel background work);
* ``session_log(session)`` / ``message_log(session, envelope)`` for ``key=value`` text added
  to the session's disconnect line and to each message's line.

The methods returning a reply are coroutines; one that completes without waiting costs no task.
A stage that raises is a local error: the command gets ``451 4.3.0`` (a stage handles the
failures it expects itself, e.g. a DNS timeout, and decides whether they fail open).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("farm.smtp")

__all__ = ["EndOfData", "Stage", "Stages", "edit_header", "header_end"]

#: ``remove(name, value) -> bool``: whether a header field goes (name as sent, value raw).
HeaderFilter = Callable[[str, bytes], bool]


@dataclass(frozen=True, slots=True)
class EndOfData:
    """What an end-of-data stage decided about a message."""

    #: A 4xx/5xx reply ending the transaction (nothing is delivered); None: go on. A 2xx
    #: reply accepts the message without delivering it (a milter's discard).
    reply: str | None = None
    #: Header fields ``(name, value)`` prepended to the message, in this order.
    add_headers: tuple[tuple[str, str], ...] = ()
    #: Header fields for which this returns True are removed first.
    remove_headers: HeaderFilter | None = None


#: The decision that changes nothing.
GO_ON = EndOfData()


class Stage:
    """A check in the session's way; the defaults do nothing (override what you need)."""

    #: Short name for logs.
    name = "stage"

    def connect(self, session: Any) -> None:
        """The connection was accepted; start what can run before the greeting."""

    async def greet(self, session: Any) -> str | None:
        return None

    async def mail(self, session: Any, envelope: Any, address: str) -> str | None:
        return None

    async def rcpt(self, session: Any, envelope: Any, address: str) -> str | None:
        return None

    async def end_of_data(self, session: Any, envelope: Any) -> EndOfData:
        return GO_ON

    def close(self, session: Any) -> None:
        """The connection is gone."""

    def session_log(self, session: Any) -> str:
        return ""

    def message_log(self, session: Any, envelope: Any) -> str:
        return ""


def _overrides(stage: Stage, method: str) -> bool:
    return getattr(type(stage), method) is not getattr(Stage, method)


class Stages:
    """The engine's view of its stages: each hook point lists only the stages that use it."""

    def __init__(self, stages: Iterable[Stage]) -> None:
        self.all = tuple(stages)
        for stage in self.all:
            if not isinstance(stage, Stage):
                raise TypeError(f"a stage must be a farm.smtp.stages.Stage, not {stage!r}")

        def using(method: str) -> tuple[Stage, ...]:
            return tuple(stage for stage in self.all if _overrides(stage, method))

        self.on_connect = using("connect")
        self.on_greet = using("greet")
        self.on_mail = using("mail")
        self.on_rcpt = using("rcpt")
        self.on_end_of_data = using("end_of_data")
        self.on_close = using("close")
        self._session_log = using("session_log")
        self._message_log = using("message_log")

    def connect(self, session: Any) -> None:
        for stage in self.on_connect:
            stage.connect(session)

    async def greet(self, session: Any) -> str | None:
        for stage in self.on_greet:
            reply = await stage.greet(session)
            if reply is not None:
                return reply
        return None

    async def mail(self, session: Any, envelope: Any, address: str) -> str | None:
        for stage in self.on_mail:
            reply = await stage.mail(session, envelope, address)
            if reply is not None:
                return reply
        return None

    async def rcpt(self, session: Any, envelope: Any, address: str) -> str | None:
        for stage in self.on_rcpt:
            reply = await stage.rcpt(session, envelope, address)
            if reply is not None:
                return reply
        return None

    async def end_of_data(
        self, session: Any, envelope: Any, decode: Callable[[bytes], Any]
    ) -> str | None:
        """Run the end-of-data stages; apply their header edits to the envelope's content
        (``decode`` turns the edited bytes into ``envelope.content``). Returns a reply that
        ends the transaction, or None."""
        for stage in self.on_end_of_data:
            decision = await stage.end_of_data(session, envelope)
            if decision.reply is not None:
                return decision.reply
            if decision.add_headers or decision.remove_headers is not None:
                # Body spooling would plug in here: only the header section is rewritten.
                edited = edit_header(
                    envelope.original_content, decision.add_headers, decision.remove_headers
                )
                envelope.original_content = edited
                envelope.content = decode(edited)
        return None

    def close(self, session: Any) -> None:
        for stage in self.on_close:
            try:
                stage.close(session)
            except Exception:
                log.exception("session=%s stage %s: close failed", session.id, stage.name)

    def session_log(self, session: Any) -> str:
        return _joined(stage.session_log(session) for stage in self._session_log)

    def message_log(self, session: Any, envelope: Any) -> str:
        return _joined(stage.message_log(session, envelope) for stage in self._message_log)


def _joined(parts: Iterable[str]) -> str:
    text = " ".join(part for part in parts if part)
    return " " + text if text else ""


def header_end(content: bytes) -> int:
    """Where the header section ends: the offset of the empty line's CRLF (or LF), or
    ``len(content)`` for a message that is all header."""
    crlf = content.find(b"\r\n\r\n")
    lf = content.find(b"\n\n")
    if content.startswith((b"\r\n", b"\n")):
        return 0
    if crlf < 0 and lf < 0:
        return len(content)
    if crlf < 0 or (0 <= lf < crlf):
        return lf + 1
    return crlf + 2


def header_fields(content: bytes) -> list[tuple[str, bytes, int, int]]:
    """The header fields as ``(name, raw value, start, end)``; ``end`` includes the line end
    of the field's last line. A line that is neither a field nor a continuation ends the
    header (as it does for most parsers)."""
    end = header_end(content)
    fields: list[tuple[str, bytes, int, int]] = []
    position = 0
    while position < end:
        line_end = content.find(b"\n", position, end)
        stop = end if line_end < 0 else line_end + 1
        # Continuation lines (starting with a space or a tab) belong to the field.
        while stop < end and content[stop : stop + 1] in (b" ", b"\t"):
            next_end = content.find(b"\n", stop, end)
            stop = end if next_end < 0 else next_end + 1
        colon = content.find(b":", position, stop)
        if colon <= position:
            break
        name = content[position:colon].decode("ascii", "replace").strip()
        fields.append((name, content[colon + 1 : stop], position, stop))
        position = stop
    return fields


def edit_header(
    content: bytes,
    add: Iterable[tuple[str, str]] = (),
    remove: HeaderFilter | None = None,
) -> bytes:
    """``content`` with the fields ``remove`` selects taken out of its header and ``add``
    prepended (CRLF line ends; values must already be folded if long)."""
    parts = [f"{name}: {value}\r\n".encode("utf-8", "surrogateescape") for name, value in add]
    if remove is None:
        return b"".join(parts) + content
    kept_from = 0
    for name, value, start, stop in header_fields(content):
        if remove(name, value):
            parts.append(content[kept_from:start])
            kept_from = stop
    parts.append(content[kept_from:])
    return b"".join(parts)
