"""Who may send a HAProxy PROXY header (``proxy_trusted_networks``).

:class:`farm.smtp.SMTP` reads the header (parsed by :mod:`farm.smtp.proxy_header`) before the
greeting. A peer outside ``proxy_trusted_networks`` is closed before any byte is read; a
malformed or late header closes the connection; the handler's ``handle_PROXY`` decides whether
the session goes on (absent: it does not).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(networks: Iterable[Any] | None) -> tuple[Network, ...] | None:
    """``["10.0.0.0/8", "::1"]`` -> networks; None means every peer may send a header."""
    if networks is None:
        return None
    return tuple(ipaddress.ip_network(str(n), strict=False) for n in networks)


def peer_trusted(peer: Any, networks: tuple[Network, ...] | None) -> bool:
    """Whether ``peer`` (a socket address) may send a header (None: every peer may)."""
    if networks is None:
        return True
    if not isinstance(peer, tuple) or not peer:
        return False  # a Unix-socket peer has no address to check
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
