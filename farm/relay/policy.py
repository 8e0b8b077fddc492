"""Recipient policy for ``farm.relay.Relay``: whose mail we take, and who may relay through us.

A recipient is accepted when its domain is one of ``domains`` (exact, or ``.example.com`` for
any subdomain of example.com; case-insensitive, a trailing dot ignored, internationalised names
compared in their UTS #46 non-transitional A-label form), or when the session is
authenticated, or when the client address is in ``trusted_networks``. The client address is the
PROXY header's source when the session had one (none when the header carried no usable
source: such a session is never trusted), else the socket peer. The classic
open-relay probe forms are refused for everyone (percent hack, bang path, quoted or unquoted
``@`` in the local part, foreign IP literals).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

from farm.limits import client_address, unmapped
from farm.relay.routes import normalise_domain, split_address

__all__ = ["INVALID_DOMAIN", "IPAddress", "RecipientPolicy", "client_ip"]

#: ``check_recipient``'s reason for a domain that is not a valid internationalised name.
INVALID_DOMAIN = "invalid domain"

#: C0 controls and DEL: never in an address we accept.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_literal(domain: str) -> IPAddress | None:
    """The address of ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``; None if not a valid literal."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    try:
        if inner.lower().startswith("ipv6:"):
            return ipaddress.IPv6Address(inner[5:])
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def client_ip(session: Any) -> IPAddress | None:
    """The PROXY header's source address if the session has a valid one, else the peer's."""
    return client_address(getattr(session, "peer", None), getattr(session, "proxy_data", None))


class RecipientPolicy:
    """``domains`` we accept mail for; ``trusted_networks`` that may relay anywhere."""

    def __init__(self, domains: Iterable[object], trusted_networks: Iterable[Any] = ()) -> None:
        if isinstance(domains, str):
            raise TypeError("domains must be a list of domains, not one string")
        if isinstance(trusted_networks, str):
            raise TypeError("trusted_networks must be a list of networks, not one string")
        self._exact: set[str] = set()
        self._literals: set[IPAddress] = set()
        parents = []
        for entry in domains:
            if not isinstance(entry, str):
                raise ValueError(f"bad domain {entry!r}: not a string")
            try:
                domain = normalise_domain(entry)
            except ValueError as error:
                raise ValueError(f"bad domain {entry!r}: {error}") from None
            literal = ip_literal(domain)
            if literal is not None:
                self._literals.add(unmapped(literal))
            elif domain.startswith(".") and len(domain) > 1:
                parents.append(domain)
            elif domain:
                self._exact.add(domain)
            else:
                raise ValueError(f"bad domain {entry!r}")
        self._parents = tuple(parents)
        self.trusted_networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(net, strict=False) for net in trusted_networks
        )

    def is_local_domain(self, domain: str) -> bool:
        """True when ``domain`` is one of ours (an exact entry, or under a ``.parent`` entry)."""
        try:
            domain = normalise_domain(domain)
        except ValueError:
            return False
        return self._ours(domain)

    def _ours(self, domain: str) -> bool:
        """``is_local_domain`` for a normalised domain."""
        literal = ip_literal(domain)
        if literal is not None:
            return unmapped(literal) in self._literals
        if domain in self._exact:
            return True
        return bool(self._parents) and any(domain.endswith(parent) for parent in self._parents)

    def is_trusted(self, session: Any) -> bool:
        """True when the session is authenticated or its client is in ``trusted_networks``."""
        if getattr(session, "authenticated", False):
            return True
        ip = client_ip(session)
        return ip is not None and any(ip in net for net in self.trusted_networks)

    def check_recipient(self, session: Any, address: str) -> str | None:
        """None when ``address`` may be accepted in ``session``; else why not (for the log)."""
        local, domain = split_address(address)
        if _CONTROL.search(address) is not None:
            return "control character"
        if local.startswith("@"):
            return "source route"
        if "!" in local:
            return "bang path"
        if "%" in local:
            return "percent hack"
        if "@" in local:
            return "@ in local part"
        if domain is None:
            if local.lower() == "postmaster":  # RFC 5321 4.5.1: must be accepted
                return None
            return "no domain"
        if domain.startswith("[") or ip_literal(domain.strip()) is not None:
            return None if self.is_local_domain(domain) else "foreign IP literal"
        try:
            normalised = normalise_domain(domain)
        except ValueError:
            return INVALID_DOMAIN
        if self._ours(normalised):
            return None
        if self.is_trusted(session):
            return None
        return "foreign domain"
