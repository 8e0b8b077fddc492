"""Loopback ports at the socket level: free ones chosen at run time, taken ones, refused ones."""

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
        return sock.getsockname()[1]


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
