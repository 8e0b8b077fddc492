"""The supervisor <-> worker channel: typed messages, one line each, over a socketpair.

Both ends are non-blocking. EOF tells either side that the other is gone. The messages and
their wire format are in :mod:`farm.supervisor.messages`.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from farm.supervisor.messages import Message, decode, encode

#: A message larger than this is a protocol error (metrics exposition fits well below it).
MAX_MESSAGE = 16 * 1024 * 1024


class ChannelClosed(Exception):
    """The other end closed the channel (or broke it)."""


class Channel:
    """One end of a socketpair carrying messages, one per line."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._eof = False

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        """(supervisor end, worker end)."""
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(left), cls(right)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    # -- sending ---------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a message and write as much as the socket takes now."""
        self._outbox += encode(message)
        self.flush()

    def send_many(self, messages: Sequence[Message]) -> None:
        """Queue several messages and write them with one system call."""
        self._outbox += b"".join(encode(message) for message in messages)
        self.flush()

    @property
    def pending_output(self) -> int:
        return len(self._outbox)

    def flush(self) -> None:
        """Write queued bytes without blocking; raise ChannelClosed if the peer is gone."""
        while self._outbox:
            try:
                sent = self.sock.send(self._outbox)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                raise ChannelClosed(str(error)) from None
            del self._outbox[:sent]

    # -- receiving -------------------------------------------------------------------------

    def receive(self) -> list[Message]:
        """Read what is available and return the complete messages; ChannelClosed at EOF.

        A line that is no message (see :func:`~farm.supervisor.messages.decode`) is logged
        and skipped.
        """
        if self._eof:
            raise ChannelClosed("end of file")
        while True:
            try:
                chunk = self.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                raise ChannelClosed(str(error)) from None
            if not chunk:
                self._eof = True  # deliver what is complete first; raise on the next call
                break
            self._inbox += chunk
            if len(chunk) < 262144:
                break
        messages: list[Message] = []
        while True:
            end = self._inbox.find(b"\n")
            if end < 0:
                if len(self._inbox) > MAX_MESSAGE:
                    raise ChannelClosed("message too large")
                if self._eof and not messages:
                    raise ChannelClosed("end of file")
                return messages
            line = bytes(self._inbox[:end])
            del self._inbox[: end + 1]
            message = decode(line)
            if message is not None:
                messages.append(message)
