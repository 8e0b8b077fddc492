"""The one raw SMTP client of the tests: bytes on a blocking socket, replies as the server sent
them.

A test sees exactly what went over the wire: :meth:`SMTPClient.send` writes any bytes (a whole
stream at once, or one byte per write), :meth:`SMTPClient.reply` reads one (possibly multi-line)
reply and checks its form (every line ``NNN`` and CRLF-terminated, no partial line or half a
multi-line reply before a close), :meth:`SMTPClient.read_to_close` reads raw bytes up to the
server's close. It speaks over TCP or a Unix socket (:meth:`SMTPClient.unix`), can switch to TLS
after STARTTLS (:meth:`SMTPClient.starttls`) and half-close (:meth:`SMTPClient.half_close`).
smtplib is the client for everything that needs no raw access.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from tests.support.wait import WAIT


class Reply(str):
    """One reply: the text as sent (CRLFs included); ``""`` (code 0) when the server closed.

    ``lines`` are its lines without CRLF, ``code`` is its number, ``text`` its last line.
    """

    code: int
    lines: list[str]

    def __new__(cls, lines: list[str]) -> Reply:
        reply = super().__new__(cls, "".join(line + "\r\n" for line in lines))
        reply.lines = lines
        reply.code = int(lines[-1][:3]) if lines else 0
        return reply

    @property
    def text(self) -> str:
        """The last line, e.g. ``"500 Command line too long"``."""
        return self.lines[-1] if self.lines else ""


def codes(replies: list[Reply]) -> list[int]:
    return [reply.code for reply in replies]


class SMTPClient:
    """A raw, blocking SMTP client on ``host:port`` (a ``host`` starting with ``/`` is the path of
    a Unix socket, see :meth:`unix`).

    ``source``: the local address to connect from (a loopback alias such as ``127.0.0.2``).
    ``small_buffers``: small kernel socket buffers, so that a flood is not absorbed by them.
    ``greeting=True`` reads the one-line greeting at once (kept in ``greeting``).
    """

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        timeout: float = WAIT,
        source: str | None = None,
        small_buffers: bool = False,
        greeting: bool = False,
    ) -> None:
        unix = host.startswith("/")
        family = socket.AF_UNIX if unix else socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if small_buffers:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            if not unix:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(timeout)
            if source is not None:
                self.sock.bind((source, 0))
            self.sock.connect(host if unix else (host, port))
        except BaseException:
            self.sock.close()
            raise
        self._buf = b""
        self._pos = 0  # start of the unread part of _buf
        self.eof = False
        self.greeting = self.line() if greeting else ""

    @classmethod
    def of(cls, server: Any, **kwargs: Any) -> SMTPClient:
        """A client of a Controller (anything with ``hostname`` and ``port``)."""
        return cls(server.port, server.hostname, **kwargs)

    @classmethod
    def unix(cls, path: str | Path, **kwargs: Any) -> SMTPClient:
        """A client of the Unix stream socket at ``path``."""
        return cls(0, str(Path(path).absolute()), **kwargs)

    def __enter__(self) -> SMTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """TLS from here on (after the server's 220 to STARTTLS); nothing may be unread."""
        assert self._pos == len(self._buf), f"unread before TLS: {self._buf[self._pos :]!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def half_close(self) -> None:
        """Shut down the sending side (the server reads an end of stream); reading goes on."""
        self.sock.shutdown(socket.SHUT_WR)

    # -- writing ------------------------------------------------------------------------------

    def send(self, data: bytes | memoryview | str, bytewise: bool = False) -> None:
        """Write ``data`` in one ``sendall``, or one byte per write."""
        raw = data.encode() if isinstance(data, str) else data
        if not bytewise:
            self.sock.sendall(raw)
            return
        for i in range(len(raw)):
            self.sock.sendall(raw[i : i + 1])

    def command(self, line: bytes | str) -> Reply:
        """Send ``line`` and CRLF; the reply."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def cmd(self, line: bytes | str) -> str:
        """Send ``line`` and CRLF; the one-line reply, without CRLF."""
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.line()

    # -- reading ------------------------------------------------------------------------------

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return True

    def _line(self) -> bytes | None:
        while (end := self._buf.find(b"\r\n", self._pos)) < 0:
            if not self._fill():
                rest = self._buf[self._pos :]
                assert rest == b"", f"partial line before close: {rest!r}"
                return None
        line = self._buf[self._pos : end]
        self._pos = end + 2
        return line

    def reply(self) -> Reply:
        """The next (possibly multi-line) reply; an empty one if the server closed instead."""
        lines: list[str] = []
        while True:
            line = self._line()
            if line is None:
                assert not lines, f"close inside a multi-line reply: {lines}"
                return Reply([])
            text = line.decode("utf-8", "replace")
            assert len(text) >= 3 and text[:3].isdigit(), f"not a reply line: {text!r}"
            lines.append(text)
            if text[3:4] != "-":
                return Reply(lines)

    def line(self) -> str:
        """A one-line reply, without CRLF."""
        reply = self.reply()
        assert len(reply.lines) == 1, reply.lines or "closed instead of replying"
        return reply.text

    def replies_until_close(self) -> list[Reply]:
        """Every reply the server sends until it closes."""
        replies = []
        while reply := self.reply():
            replies.append(reply)
        return replies

    def read_to_close(self) -> bytes:
        """The raw bytes the server sends until it closes (a reset counts as a close)."""
        data = self._buf[self._pos :]
        self._buf, self._pos = b"", 0
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        self.eof = True
        return data

    def at_eof(self, timeout: float = WAIT) -> bool:
        """Whether the server closed the connection (waits up to ``timeout`` for it)."""
        if self._pos < len(self._buf):
            return False
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def smtp_greeting(port: int) -> str:
    """The greeting of the server on ``port`` (the connection is closed at once)."""
    with SMTPClient(port) as client:
        return client.reply()


def send_message(port: int, rcpt: str, body: str = "Subject: test\r\n\r\nhello\r\n") -> str:
    """One whole transaction; returns the reply to the final dot."""
    with SMTPClient(port) as client:
        assert client.reply().startswith("220 ")
        assert client.command("EHLO client.test").startswith("250")
        assert client.command("MAIL FROM:<sender@client.test>").startswith("250")
        assert client.command(f"RCPT TO:<{rcpt}>").startswith("250")
        assert client.command("DATA").startswith("354")
        reply = client.command(body + ".")
        client.command("QUIT")
        return reply
