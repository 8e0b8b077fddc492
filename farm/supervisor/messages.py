"""Every message the supervisor and its workers exchange, typed, and their wire format.

On the wire a message is one JSON object per line with its kind under ``"t"``, e.g.
``{"t":"hb","lag":0.0,"sessions":3,"messages":120}``. Each kind is a small frozen dataclass;
:func:`encode` and :func:`decode` are the only code that knows the field names on the wire.

Worker -> supervisor: :class:`Ready`, :class:`Heartbeat`, :class:`Recycle`, :class:`Metrics`.
Supervisor -> worker: :class:`MetricsRequest`. Stops go by signal, not by message.

A line that is not JSON, not an object, of an unknown kind or with a missing or mistyped field
is logged and dropped by :func:`decode` (it returns None): a peer's mistake never ends the
process that reads it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

__all__ = [
    "Heartbeat",
    "Kind",
    "Message",
    "Metrics",
    "MetricsRequest",
    "Ready",
    "Recycle",
    "ToSupervisor",
    "ToWorker",
    "decode",
    "encode",
]

log = logging.getLogger("farm.supervisor.messages")

#: At most this much of a rejected line goes into the log.
_LOGGED_CHARS = 200


class Kind(StrEnum):
    """The value of ``"t"`` on the wire, one per message class."""

    READY = "ready"
    HEARTBEAT = "hb"
    RECYCLE = "recycle"
    METRICS = "metrics"
    METRICS_REQUEST = "metrics?"


class MalformedMessage(ValueError):
    """A field is missing or has the wrong type."""


def _int(fields: dict[str, Any], name: str) -> int:
    value = fields[name]
    if type(value) is not int:
        raise MalformedMessage(f"{name!r} is not an integer")
    return value


def _float(fields: dict[str, Any], name: str) -> float:
    value = fields[name]
    if type(value) not in (int, float):
        raise MalformedMessage(f"{name!r} is not a number")
    return float(value)


def _str(fields: dict[str, Any], name: str) -> str:
    value = fields[name]
    if not isinstance(value, str):
        raise MalformedMessage(f"{name!r} is not a string")
    return value


@dataclass(frozen=True, slots=True)
class Ready:
    """Worker -> supervisor: listening and serving; the supervisor may retire what it replaces."""

    kind: ClassVar[Kind] = Kind.READY

    def to_wire(self) -> dict[str, Any]:
        return {"t": "ready"}

    @classmethod
    def from_wire(cls, fields: dict[str, Any]) -> Ready:
        return cls()


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Worker -> supervisor, every second: event-loop lag (seconds) and its counts."""

    lag: float
    sessions: int
    messages: int

    kind: ClassVar[Kind] = Kind.HEARTBEAT

    def to_wire(self) -> dict[str, Any]:
        return {"t": "hb", "lag": self.lag, "sessions": self.sessions, "messages": self.messages}

    @classmethod
    def from_wire(cls, fields: dict[str, Any]) -> Heartbeat:
        return cls(_float(fields, "lag"), _int(fields, "sessions"), _int(fields, "messages"))


@dataclass(frozen=True, slots=True)
class Recycle:
    """Worker -> supervisor: please start my replacement (``reason``, e.g. ``max_messages``)."""

    reason: str

    kind: ClassVar[Kind] = Kind.RECYCLE

    def to_wire(self) -> dict[str, Any]:
        return {"t": "recycle", "reason": self.reason}

    @classmethod
    def from_wire(cls, fields: dict[str, Any]) -> Recycle:
        return cls(_str(fields, "reason"))


@dataclass(frozen=True, slots=True)
class Metrics:
    """Worker -> supervisor: its exposition (Prometheus text format).

    ``request`` is the :class:`MetricsRequest` it answers, or None for the final totals a
    worker sends on its way out.
    """

    request: int | None
    text: str

    kind: ClassVar[Kind] = Kind.METRICS

    def to_wire(self) -> dict[str, Any]:
        return {"t": "metrics", "id": self.request, "text": self.text}

    @classmethod
    def from_wire(cls, fields: dict[str, Any]) -> Metrics:
        request = None if fields["id"] is None else _int(fields, "id")
        return cls(request, _str(fields, "text"))


@dataclass(frozen=True, slots=True)
class MetricsRequest:
    """Supervisor -> worker: send your metrics, answering with this ``request`` number."""

    request: int

    kind: ClassVar[Kind] = Kind.METRICS_REQUEST

    def to_wire(self) -> dict[str, Any]:
        return {"t": "metrics?", "id": self.request}

    @classmethod
    def from_wire(cls, fields: dict[str, Any]) -> MetricsRequest:
        return cls(_int(fields, "id"))


ToSupervisor = Ready | Heartbeat | Recycle | Metrics
ToWorker = MetricsRequest
Message = ToSupervisor | ToWorker

_CLASSES: dict[str, type[Message]] = {
    cls.kind.value: cls for cls in (Ready, Heartbeat, Recycle, Metrics, MetricsRequest)
}
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def encode(message: Message) -> bytes:
    """The message as one wire line, newline included."""
    return _encode_json(message.to_wire()).encode() + b"\n"


def decode(line: bytes) -> Message | None:
    """The message on one wire line (without its newline), or None if it is not one (logged)."""
    try:
        fields = json.loads(line)
    except ValueError:
        why = "not JSON"
    else:
        if not isinstance(fields, dict):
            why = "not a JSON object"
        else:
            kind = fields.get("t")
            cls = _CLASSES.get(kind) if isinstance(kind, str) else None
            if cls is None:
                why = "unknown kind"
            else:
                try:
                    return cls.from_wire(fields)
                except KeyError as error:
                    why = f"no field {error}"
                except MalformedMessage as error:
                    why = str(error)
    log.warning("channel: ignoring a message (%s): %r", why, line[:_LOGGED_CHARS])
    return None
