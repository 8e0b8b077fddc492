"""Log lines made of fields, safe against forging by the client.

A session's log lines carry values the client chose (its HELO name, its MAIL FROM address).
:func:`quote` makes such a value one unambiguous token: a plain printable-ASCII value without
spaces or quotes stays as it is, anything else goes between double quotes with ``\\``, ``"``
and every character that is not printable (CR, LF, NUL, U+2028, U+2029, U+0085, surrogates
from undecodable bytes...) escaped as ``\\xNN``/``\\uNNNN``/``\\UNNNNNNNN``. So a client can
neither add a field (``outcome=550`` after a space) nor start a new line.

:class:`Fields` is a log message (``logger.info(MessageLine(...))``): rendered as
``key=value`` text by ``str()`` (what any ``logging`` handler shows, only when a handler
formats it), and read field by field by the farm's JSON formatter (``farm.logs``). The two
lines of the engine (:class:`MessageLine`, :class:`SessionLine`) render with one f-string,
since they are written once per message and once per session.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

__all__ = ["Fields", "MessageLine", "SessionLine", "escape", "log_info", "printable", "quote"]

#: Printable ASCII except space, ``"`` and ``\``: safe to log bare.
_BARE = re.compile(r"[!#-\[\]-~]+").fullmatch


def _escaped_char(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char == '"':
        return '\\"'
    if char.isprintable():
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """``text`` with ``\\``, ``"`` and every unprintable character escaped."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return "".join(_escaped_char(char) for char in text)


def _unprintable_escaped(char: str) -> str:
    return char if char.isprintable() else _escaped_char(char)


def printable(text: str) -> str:
    """``text`` with only its unprintable characters escaped (a whole log message)."""
    if text.isprintable():
        return text
    return "".join(_unprintable_escaped(char) for char in text)


def quote(value: str) -> str:
    """A value from the client as one log token (see the module docstring)."""
    if _BARE(value):
        return value
    return f'"{escape(value)}"'


class Fields:
    """A log message of named fields, rendered as ``key=value`` text by ``str()``.

    Subclasses name the ``event`` and list the field ``names``; ``values`` come in that order.
    Strings the client chose are quoted with :func:`quote` when rendered, floats are durations
    (``0.002s``). The JSON formatter (``farm.logs``) reads :meth:`as_dict` instead.
    """

    __slots__ = ("values",)
    event = "fields"
    names: tuple[str, ...] = ()

    def __init__(self, *values: Any) -> None:
        self.values = values

    def __str__(self) -> str:
        return " ".join(
            [f"{key}={_text(value)}" for key, value in zip(self.names, self.values, strict=True)]
        )

    def as_dict(self) -> dict[str, Any]:
        """The fields for the JSON format (``event`` first; ``None`` values left out)."""
        data: dict[str, Any] = {"event": self.event}
        for key, value in zip(self.names, self.values, strict=True):
            if value is not None:
                data[key] = value
        return data


class MessageLine(Fields):
    """The line of one message (``outcome`` is its reply code)."""

    __slots__ = ()
    event = "message"
    names = ("session", "msg", "peer", "client", "from", "rcpts", "size", "outcome", "duration")

    def __str__(self) -> str:
        session, msg, peer, client, sender, rcpts, size, outcome, duration = self.values
        via = f" client={client}" if client is not None else ""
        return (
            f"session={session} msg={msg} peer={peer}{via} from={quote(sender)} rcpts={rcpts} "
            f"size={size} outcome={outcome} duration={duration:.3f}s"
        )


class SessionLine(Fields):
    """The line of one session, at its end."""

    __slots__ = ()
    event = "session"
    names = (
        "session",
        "peer",
        "client",
        "helo",
        "commands",
        "accepted",
        "rejected",
        "bytes",
        "end",
        "duration",
    )

    def __str__(self) -> str:
        session, peer, client, helo, commands, accepted, rejected, size, end, duration = self.values
        via = f" client={client}" if client is not None else ""
        return (
            f"session={session} peer={peer}{via} helo={quote(helo)} commands={commands} "
            f"accepted={accepted} rejected={rejected} bytes={size} end={end} "
            f"duration={duration:.3f}s"
        )


def _text(value: Any) -> str:
    kind = type(value)
    if kind is str:
        return quote(value)
    if kind is float:
        return f"{value:.3f}s"
    return str(value)


_LogRecord = logging.LogRecord
_new_record = _LogRecord.__new__
#: The attributes every record of :func:`log_info` shares (what ``LogRecord()`` computes).
_RECORD_DEFAULTS = dict(_LogRecord("", logging.INFO, "(unknown file)", 0, "", (), None).__dict__)


def log_info(logger: logging.Logger, message: Any) -> None:
    """``logger.info(message)``, for the lines logged once per message or session.

    The record goes through ``logger.handle()`` like any other (levels, filters and every
    handler apply), but it is a copy of a prepared one with the time set, instead of one
    built by ``LogRecord.__init__`` (which also looks up the source file and thread each
    time). A custom record factory (``logging.setLogRecordFactory``) is honoured: then this
    is plain ``logger.info``.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    if logging.getLogRecordFactory() is not _LogRecord or logging._srcfile:  # type: ignore[attr-defined]
        logger.info(message)
        return
    record = _new_record(_LogRecord)
    attributes = record.__dict__
    attributes.update(_RECORD_DEFAULTS)
    now = time.time()
    attributes["name"] = logger.name
    attributes["msg"] = message
    attributes["created"] = now
    attributes["msecs"] = (now - int(now)) * 1000
    attributes["relativeCreated"] = (now - logging._startTime) * 1000  # type: ignore[attr-defined]
    logger.handle(record)
