"""A fake systemd ``NOTIFY_SOCKET``: the datagrams sd_notify sends, as the tests receive them."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid

from tests.support.wait import WAIT


class NotifySocket:
    """An AF_UNIX datagram socket in a short temporary directory, or (``abstract=True``) in the
    abstract namespace. ``address`` is the value for ``NOTIFY_SOCKET``; ``received`` keeps what
    :meth:`next_with` read, parsed."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: str | None = None
        if abstract:
            name = f"farm-test-notify-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:  # a short path: AF_UNIX paths are limited to 107 octets
            self._dir = tempfile.mkdtemp(prefix="farm-notify-")
            self.address = os.path.join(self._dir, "notify")
            self.sock.bind(self.address)
        self.received: list[dict[str, str]] = []

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def recv(self, timeout: float = WAIT) -> bytes:
        """The next datagram (waits up to ``timeout`` for it)."""
        self.sock.settimeout(timeout)
        return self.sock.recv(65536)

    def pending(self) -> list[bytes]:
        """The datagrams already received, without waiting for more."""
        datagrams = []
        self.sock.setblocking(False)
        try:
            while True:
                datagrams.append(self.sock.recv(65536))
        except BlockingIOError:
            return datagrams

    def next_with(self, key: str, timeout: float = WAIT) -> dict[str, str]:
        """The next datagram that has ``key`` (others are kept in ``received``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} within {timeout:g}s; got {self.received}")
            try:
                data = self.recv(left)
            except TimeoutError:
                continue
            fields = dict(line.partition("=")[::2] for line in data.decode().splitlines())
            self.received.append(fields)
            if key in fields:
                return fields
