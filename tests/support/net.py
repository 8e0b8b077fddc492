"""Loopback ports at the socket level: free ones chosen at run time, taken ones, and whether
something listens on one."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` (an IPv4 or IPv6 address) right now."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host`` right now (for a DNS server)."""
    for _ in range(50):
        with socket.socket(_family(host), socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(_family(host), socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


@contextmanager
def taken_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port a socket listens on (and never accepts) while the block runs: binding it fails;
    connecting to it succeeds, into the kernel's backlog, and nothing is ever said."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        sock.listen(4)
        yield sock.getsockname()[1]


def refused(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a connection to ``port`` is refused right now (nothing listens there)."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a connection to ``port`` is accepted right now (closed again at once)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        return sock.connect_ex((host, port)) == 0
