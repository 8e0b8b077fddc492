"""The relay client's errors (interpreted: compiled code cannot subclass ``ConnectionError``)."""

from __future__ import annotations


class NextHopError(Exception):
    """The next hop could not be used: ``reply`` for the client, the message for the log."""

    def __init__(self, reply: str, detail: str) -> None:
        super().__init__(detail)
        self.reply = reply


class ProtocolError(ConnectionError):
    """The next hop broke the protocol (malformed, unsolicited or oversized replies)."""
