"""Next-hop routes for ``farm.relay.Relay``: which next hop a recipient's mail goes to.

A route is written ``HOST:PORT`` or ``smtp:HOST:PORT`` (SMTP) or ``lmtp:HOST:PORT`` (LMTP);
``[IPv6]:PORT`` works as for listeners. ``routes`` maps a domain to a route: ``example.com``
matches that domain only, ``.example.org`` any domain under example.org (not example.org
itself); case-insensitive, a trailing dot ignored, internationalised names compared in their
UTS #46 A-label form (:func:`normalise_domain`), the longest match wins. A recipient that
matches no entry (or has no domain, or an IP-literal domain) goes to the default next hop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import idna

from farm.addresses import parse_address

__all__ = [
    "Route",
    "RouteTable",
    "judged_address",
    "normalise_domain",
    "parse_route",
    "split_address",
]


@dataclass(frozen=True, slots=True)
class Route:
    """One next hop: where it is and which protocol it speaks."""

    host: str
    port: int
    lmtp: bool = False

    @property
    def text(self) -> str:
        """``HOST:PORT`` (``lmtp:HOST:PORT`` for LMTP), for logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'lmtp:' if self.lmtp else ''}{host}:{self.port}"

    def __str__(self) -> str:
        return self.text


def parse_route(value: object, *, lmtp: bool = False) -> Route:
    """``[smtp:|lmtp:]HOST:PORT`` -> a ``Route``; ``lmtp`` is the protocol when none is given."""
    if not isinstance(value, str):
        raise ValueError(f"bad next hop {value!r}: expected [smtp:|lmtp:]HOST:PORT")
    text = value.strip()
    scheme, sep, rest = text.partition(":")
    if sep and scheme.lower() in ("smtp", "lmtp"):
        lmtp = scheme.lower() == "lmtp"
        text = rest
    try:
        address = parse_address(text)
    except ValueError as error:
        raise ValueError(f"bad next hop {value!r}: {error}") from None
    if address.kind != "tcp" or not address.port or not address.host:
        raise ValueError(f"bad next hop {value!r}: expected [smtp:|lmtp:]HOST:PORT")
    return Route(address.host, address.port, lmtp)


def normalise_domain(domain: str) -> str:
    """Lower-case, without a trailing dot; a non-ASCII domain in its ASCII (A-label) form by
    UTS #46 non-transitional processing, as IDNA 2008 software (libidn2, Postfix) computes it:
    ``busineß.com`` is ``xn--busine-gta.com``, not ``business.com`` (Python's ``idna`` codec,
    IDNA 2003). A leading dot (a ``.parent`` entry) is kept.

    Raises ValueError for a non-ASCII domain that is not a valid internationalised name.
    """
    domain = domain.strip(" \t")  # ASCII blanks only: U+2028 and the like are not blanks here
    if domain.isascii():
        return domain.rstrip(".").lower()
    try:
        mapped = idna.uts46_remap(domain, std3_rules=False, transitional=False).rstrip(".")
        lead = "." if mapped.startswith(".") else ""
        name = mapped[len(lead) :]
        return lead + idna.encode(name, uts46=True, transitional=False).decode("ascii")
    except UnicodeError:  # idna.IDNAError and its kinds
        raise ValueError(f"{domain!r} is not a valid internationalised domain name") from None


def judged_address(address: str) -> str:
    """``address`` with its domain in the form the policy and the routes judged, hence what goes
    to the next hop: a non-ASCII domain as its A-label (:func:`normalise_domain`); an ASCII one
    without a trailing dot, its case kept; an IP literal as it is.

    Raises ValueError when the domain is not a valid internationalised name.
    """
    local, domain = split_address(address)
    if domain is None or domain.startswith("["):
        return address
    if domain.isascii():
        trimmed = domain.strip(" \t").rstrip(".")
        return address if trimmed == domain else f"{local}@{trimmed}"
    return f"{local}@{normalise_domain(domain)}"


def split_address(address: str) -> tuple[str, str | None]:
    """``(local part, domain)``; the domain is None when there is no ``@`` outside quotes."""
    if '"' not in address and "\\" not in address:  # the usual case: the last ``@``
        local, sign, domain = address.rpartition("@")
        return (local, domain) if sign else (address, None)
    in_quotes = escaped = False
    at = -1
    for i, char in enumerate(address):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == "@" and not in_quotes:
            at = i
    if at < 0:
        return address, None
    return address[:at], address[at + 1 :]


class RouteTable:
    """Recipient domain -> ``Route``, falling back to ``default``."""

    def __init__(self, default: Route, routes: Mapping[Any, Any] | None = None) -> None:
        if routes is not None and not isinstance(routes, Mapping):
            raise TypeError("routes must be a table of domain = next hop")
        self.default = default
        self._exact: dict[str, Route] = {}
        self._parents: list[tuple[str, Route]] = []
        for entry, value in (routes or {}).items():
            domain = normalise_domain(str(entry))
            route = parse_route(value)
            if domain.startswith(".") and len(domain) > 1:
                self._parents.append((domain, route))
            elif domain and not domain.startswith(("[", ".")):
                self._exact[domain] = route
            else:
                raise ValueError(f"bad route domain {entry!r}")
        self._parents.sort(key=lambda item: len(item[0]), reverse=True)  # longest match first

    def __len__(self) -> int:
        return len(self._exact) + len(self._parents)

    def for_domain(self, domain: str | None) -> Route:
        """The route for mail to ``domain`` (None: no domain)."""
        if not domain:
            return self.default
        try:
            domain = normalise_domain(domain)
        except ValueError:
            return self.default
        route = self._exact.get(domain)
        if route is not None:
            return route
        for parent, route in self._parents:
            if domain.endswith(parent):
                return route
        return self.default

    def for_address(self, address: str) -> Route:
        """The route for mail to ``address`` (``local@domain``)."""
        if not self._exact and not self._parents:
            return self.default  # no routes: every address goes to the default next hop
        return self.for_domain(split_address(address)[1])
