"""Listening addresses: ``HOST:PORT``, ``[IPv6]:PORT``, ``unix:/path`` and ``fd://N``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

AddressKind = Literal["tcp", "unix", "fd"]

FORMS = "HOST:PORT, [IPv6]:PORT, unix:/path or fd://N"

_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Address:
    """One parsed address; ``text`` is its canonical form (what ``parse_address`` round-trips).

    ``tcp`` sets ``host`` (no brackets) and ``port``; ``unix`` sets ``path``; ``fd`` sets ``fd``.
    """

    kind: AddressKind
    text: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    fd: int | None = None

    def __str__(self) -> str:
        return self.text

    @property
    def is_ipv6(self) -> bool:
        """True for a bracketed IPv6 literal."""
        return self.kind == "tcp" and ":" in (self.host or "")


def parse_address(text: str) -> Address:
    """Parse one address; raise ``ValueError`` with a one-line message when it is malformed."""
    if not isinstance(text, str):
        raise ValueError(f"bad address {text!r}: expected a string ({FORMS})")
    if text.startswith("fd://"):
        return _parse_fd(text)
    if text.startswith("unix:"):
        return _parse_unix(text)
    return _parse_tcp(text)


def _bad(text: str, why: str = f"expected {FORMS}") -> ValueError:
    return ValueError(f"bad address {text!r}: {why}")


def _parse_fd(text: str) -> Address:
    number = text[len("fd://") :]
    if not _DIGITS.fullmatch(number):
        raise _bad(text, "expected fd://N with N a file descriptor number >= 0")
    fd = int(number)
    return Address(kind="fd", text=f"fd://{fd}", fd=fd)


def _parse_unix(text: str) -> Address:
    path = text[len("unix:") :]
    if not path:
        raise _bad(text, "empty socket path (expected unix:/path)")
    if "\0" in path or path != path.strip():
        raise _bad(text, "socket path contains NUL or surrounding whitespace")
    return Address(kind="unix", text=f"unix:{path}", path=path)


def _parse_tcp(text: str) -> Address:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise _bad(text)
    port = _parse_port(text, port_text)
    if host.startswith("["):
        if not host.endswith("]"):
            raise _bad(text)
        host = _parse_ipv6(text, host[1:-1])
        return Address(kind="tcp", text=f"[{host}]:{port}", host=host, port=port)
    if ":" in host:
        raise _bad(text, f"an IPv6 address must be bracketed, e.g. [::1]:{port}")
    if not _HOSTNAME.fullmatch(host):
        raise _bad(text, f"{host!r} is not a host name or IPv4 address")
    return Address(kind="tcp", text=f"{host}:{port}", host=host, port=port)


def _parse_port(text: str, port_text: str) -> int:
    if not _DIGITS.fullmatch(port_text):
        raise _bad(text, f"expected {FORMS}")
    port = int(port_text)
    if port > 65535:
        raise _bad(text, "port must be 0..65535")
    return port


def _parse_ipv6(text: str, literal: str) -> str:
    try:
        return str(ipaddress.IPv6Address(literal))
    except ValueError:
        raise _bad(text, f"{literal!r} is not an IPv6 address") from None
