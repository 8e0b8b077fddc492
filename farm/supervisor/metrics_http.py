"""A minimal non-blocking HTTP endpoint for /metrics and /ready, run by the supervisor's loop.

No thread (invariant 4: the supervisor forks). The exposition text comes from
``prometheus_client``; content negotiation picks OpenMetrics when the scraper asks for it.
``/ready`` is for load balancers' health checks: ``200 ready`` while the farm serves, ``503``
with the reason (``booting``, ``stopping``, ...) otherwise.

Idle or slow clients cannot starve a new request: at :data:`MAX_CLIENTS`, a new connection
takes the slot of the client that has held one the longest without sending a complete request
(else of the oldest one not reading its answer). Requests already sent are read as soon as the
connection is accepted, so a health check is answered in one turn of the loop.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("farm.supervisor")

MAX_REQUEST = 8192
#: Clients held at once; past it, a new one takes the slot of the longest-idle (see above).
MAX_CLIENTS = 32
#: Seconds a scraper may take to send its request and read the answer.
CLIENT_TIMEOUT = 10.0
#: Seconds accepting pauses when the process is out of file descriptors.
ACCEPT_PAUSE = 1.0
#: The body of a 200 answer to ``/ready``.
READY = "ready"


class MetricsHTTPServer:
    """Serves ``GET /metrics`` and ``GET /ready`` on ``address`` (``HOST:PORT``) via ``selector``.

    ``readiness()`` returns ``"ready"`` (answered 200) or why the farm is not (answered 503).
    """

    def __init__(
        self,
        address: Any,
        selector: selectors.BaseSelector,
        collect: Callable[[Callable[[CollectorRegistry], None]], None],
        readiness: Callable[[], str] | None = None,
    ) -> None:
        host, port = _split(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(64)
        self._sock.setblocking(False)
        self._sock.set_inheritable(False)
        self._selector = selector
        self._collect = collect
        self._readiness = readiness or (lambda: READY)
        self._waiting: set[int] = set()
        self._since: dict[int, float] = {}
        self._accepting = True
        self._resume_at = 0.0
        self._clients: dict[int, tuple[socket.socket, bytearray, bytearray]] = {}
        #: Clients closed to make room for a new one.
        self.evicted = 0
        selector.register(self._sock, selectors.EVENT_READ, self._accept)
        bound = self._sock.getsockname()
        self.address = (
            f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
        )

    def fds(self) -> list[int]:
        """Every descriptor this server holds (a forked worker closes them)."""
        return [self._sock.fileno(), *self._clients]

    def close(self) -> None:
        for fd in list(self._clients):
            self._drop(fd)
        self._accepting = False
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._sock)
        self._sock.close()

    def expire(self, now: float) -> None:
        """Drop scrapers that took too long; resume accepting after a pause."""
        if self._sock.fileno() < 0:
            return
        for fd, since in list(self._since.items()):
            if now - since > CLIENT_TIMEOUT:
                self._drop(fd)
        if not self._accepting and now >= self._resume_at and len(self._clients) < MAX_CLIENTS:
            self._accepting = True
            self._selector.register(self._sock, selectors.EVENT_READ, self._accept)

    def _pause_accepting(self, seconds: float) -> None:
        if self._accepting:
            self._accepting = False
            self._resume_at = time.monotonic() + seconds
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._sock)

    def _accept(self) -> None:
        for _ in range(16):
            if len(self._clients) >= MAX_CLIENTS and not self._evict_one():
                self._pause_accepting(0.0)  # every slot awaits the workers: resumed when done
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("metrics: accept failed: %s; pausing %ss", error, ACCEPT_PAUSE)
                self._pause_accepting(ACCEPT_PAUSE)
                return
            conn.setblocking(False)
            conn.set_inheritable(False)
            fd = conn.fileno()
            self._clients[fd] = (conn, bytearray(), bytearray())
            self._since[fd] = time.monotonic()
            self._selector.register(conn, selectors.EVENT_READ, lambda fd=fd: self._readable(fd))
            self._readable(fd)  # a request that came with the connection is answered now

    def _evict_one(self) -> bool:
        """Make room for a new client by closing the one that has held its slot the longest
        without sending a complete request, else the oldest one not reading its answer.
        False when every client awaits the workers' metrics (that ends within the scrape
        timeout)."""
        candidates = [fd for fd in self._clients if fd not in self._waiting]
        if not candidates:
            return False
        victim = min(candidates, key=lambda fd: (bool(self._clients[fd][2]), self._since[fd]))
        self._drop(victim)
        self.evicted += 1
        return True

    def _readable(self, fd: int) -> None:
        conn, inbox, _ = self._clients[fd]
        try:
            chunk = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        if not chunk:
            self._drop(fd)
            return
        if fd in self._waiting:
            return  # already answering this request
        inbox += chunk
        if b"\r\n\r\n" in inbox or b"\n\n" in inbox:
            self._respond(fd)
        elif len(inbox) > MAX_REQUEST:
            self._reply(fd, 431, "text/plain", b"request header too large\n")

    def _respond(self, fd: int) -> None:
        _, inbox, _ = self._clients[fd]
        head = bytes(inbox).split(b"\r\n\r\n")[0].decode("latin-1")
        lines = head.replace("\r\n", "\n").split("\n")
        parts = lines[0].split()
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            self._reply(fd, 405, "text/plain", b"only GET\n")
            return
        path = parts[1].split("?")[0]
        if path == "/ready":
            state = self._readiness()
            body = b"" if parts[0] == "HEAD" else f"{state}\n".encode()
            self._reply(fd, 200 if state == READY else 503, "text/plain; charset=utf-8", body)
            return
        if path not in ("/metrics", "/"):
            self._reply(fd, 404, "text/plain", b"try /metrics or /ready\n")
            return
        method, accept = parts[0], headers.get("accept", "")
        self._waiting.add(fd)  # the workers answer asynchronously
        conn = self._clients[fd][0]
        self._collect(lambda registry: self._send_metrics(fd, conn, method, accept, registry))

    def _send_metrics(
        self, fd: int, conn: socket.socket, method: str, accept: str, registry: CollectorRegistry
    ) -> None:
        if fd not in self._clients or self._clients[fd][0] is not conn:
            return  # the scraper went away meanwhile
        self._waiting.discard(fd)
        encoder, content_type = choose_encoder(accept)
        body = encoder(registry)
        self._reply(fd, 200, content_type, b"" if method == "HEAD" else body)

    def _reply(self, fd: int, status: int, content_type: str, body: bytes) -> None:
        conn, _, outbox = self._clients[fd]
        reason = {
            200: "OK",
            404: "Not Found",
            405: "Method Not Allowed",
            503: "Service Unavailable",
        }.get(status, "Error")
        outbox += (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        self._selector.modify(conn, selectors.EVENT_WRITE, lambda: self._writable(fd))
        self._writable(fd)

    def _writable(self, fd: int) -> None:
        entry = self._clients.get(fd)
        if entry is None:
            return
        conn, _, outbox = entry
        try:
            sent = conn.send(outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        del outbox[:sent]
        if not outbox:
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        self._waiting.discard(fd)
        self._since.pop(fd, None)
        conn, _, _ = self._clients.pop(fd)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn)
        conn.close()


def _split(address: Any) -> tuple[str, int]:
    if hasattr(address, "host") and hasattr(address, "port"):
        return address.host, address.port
    host, _, port = str(address).rpartition(":")
    return host.strip("[]"), int(port)
