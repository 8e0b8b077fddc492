"""Asynchronous DNS for the checks (screening, SPF, DKIM, DMARC), through dnspython.

One :class:`Resolver` per worker: nameservers from ``farm.toml`` (``HOST:PORT``) or
``/etc/resolv.conf``, answers cached with their TTL (a bounded LRU), every lookup bounded by
its check's deadline, and its latency observed. A lookup never raises for a DNS outcome: it
returns a :class:`Lookup` whose ``status`` says what happened, so every check decides itself
what a failure means (screening fails open, SPF gives temperror...).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.message
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

__all__ = ["Lookup", "Resolver", "parse_nameserver"]

#: Answers kept per worker (dnspython's LRU cache honours each answer's TTL).
CACHE_SIZE = 10000
#: The TTL a negative answer gets when its SOA is missing.
NEGATIVE_TTL_DEFAULT = 60.0

OK = "ok"
NXDOMAIN = "nxdomain"
NODATA = "nodata"
ERROR = "error"


@dataclass(frozen=True, slots=True)
class Lookup:
    """The outcome of one lookup."""

    #: ``ok`` (records found), ``nxdomain``, ``nodata`` (the name exists, not the type), or
    #: ``error`` (timeout, SERVFAIL, REFUSED, no nameserver reachable...).
    status: str
    #: The rdata of the answer (dnspython objects); empty unless ``ok``.
    records: tuple[Any, ...] = ()
    #: Seconds the answer may be kept (the answer's TTL, or the negative TTL from the SOA).
    ttl: float = 0.0
    #: Why, for ``error``.
    error: str = ""

    @property
    def failed(self) -> bool:
        return self.status == ERROR


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"127.0.0.1:5353"``, ``"[::1]:53"`` or a bare IP address (port 53) -> (host, port)."""
    raw = str(text).strip()
    host, port_text = raw, "53"
    if raw.startswith("["):
        host, _, rest = raw[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise _bad_nameserver(raw)
            port_text = rest[1:]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    try:
        address = ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        raise _bad_nameserver(raw) from None
    if not 0 < port < 65536:
        raise _bad_nameserver(raw)
    return str(address), port


def _bad_nameserver(text: str) -> ValueError:
    return ValueError(f"expected a nameserver IP address with an optional port, got {text!r}")


class Resolver:
    """A worker's asynchronous resolver.

    ``observe(purpose, seconds)`` is called after each lookup (the latency histogram);
    ``cache_size`` 0: no cache (every lookup asks a nameserver).
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        cache_size: int = CACHE_SIZE,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers
            ]
        else:
            try:
                resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
            except dns.resolver.NoResolverConfiguration:
                raise RuntimeError(
                    "no nameserver in /etc/resolv.conf: set resolver in [screening] or "
                    "[authentication]"
                ) from None
        resolver.cache = dns.resolver.LRUCache(cache_size) if cache_size else None
        resolver.retry_servfail = False
        self._resolver = resolver
        self._observe = observe
        self.nameservers = tuple(str(ns) for ns in resolver.nameservers)

    async def query(self, name: str, rdtype: str, deadline: float, purpose: str = "") -> Lookup:
        """Look ``name`` up, giving up at ``deadline`` (the running loop's clock)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        lifetime = deadline - started
        if lifetime <= 0:
            return Lookup(ERROR, error="timeout")
        try:
            lookup = await self._query(name, rdtype, lifetime)
        finally:
            if self._observe is not None:
                self._observe(purpose, loop.time() - started)
        return lookup

    async def _query(self, name: str, rdtype: str, lifetime: float) -> Lookup:
        try:
            answer = await self._resolver.resolve(
                name, rdtype, raise_on_no_answer=False, lifetime=lifetime, search=False
            )
        except dns.resolver.NXDOMAIN as error:
            return Lookup(NXDOMAIN, ttl=_negative_ttl(error))
        except dns.resolver.LifetimeTimeout:
            return Lookup(ERROR, error="timeout")
        except dns.resolver.NoNameservers as error:
            return Lookup(ERROR, error=_no_nameservers_reason(error))
        except dns.exception.DNSException as error:
            return Lookup(ERROR, error=type(error).__name__)
        except (OSError, ValueError) as error:  # e.g. an unusable name or socket
            return Lookup(ERROR, error=type(error).__name__)
        ttl = max(0.0, answer.expiration - time.time())
        if answer.rrset is None:
            return Lookup(NODATA, ttl=ttl)
        return Lookup(OK, tuple(answer.rrset), ttl)


def _negative_ttl(error: dns.resolver.NXDOMAIN) -> float:
    """RFC 2308: the smaller of the SOA's TTL and its minimum field."""
    try:
        responses = error.responses()
    except Exception:
        return NEGATIVE_TTL_DEFAULT
    for response in responses.values():
        if isinstance(response, dns.message.Message):
            for rrset in response.authority:
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                    return float(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL_DEFAULT


def _no_nameservers_reason(error: dns.resolver.NoNameservers) -> str:
    """``servfail``, ``refused``, ... (the first nameserver's rcode) or ``unreachable``."""
    errors = error.kwargs.get("errors") or []
    for entry in errors:
        message = entry[-1] if isinstance(entry, tuple) and entry else None
        if isinstance(message, dns.message.Message):
            return dns.rcode.to_text(message.rcode()).lower()
    return "unreachable"
