"""The HAProxy PROXY protocol in front of an SMTP session (``proxy_protocol_timeout``).

The header is parsed before the greeting. A peer outside ``proxy_trusted_networks`` is closed
before any byte is read; a malformed or late header closes the connection; the handler's
``handle_PROXY`` decides whether the session goes on (absent: it does not).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

from farm.smtp.proxy_header import ProxyData, ProxyParser

log = logging.getLogger("farm.smtp")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(networks: Iterable[Any] | None) -> tuple[Network, ...] | None:
    """``["10.0.0.0/8", "::1"]`` -> networks; None means every peer may send a header."""
    if networks is None:
        return None
    return tuple(ipaddress.ip_network(str(n), strict=False) for n in networks)


def peer_trusted(peer: Any, networks: tuple[Network, ...] | None) -> bool:
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


class ProxyProtocolMixin:
    """PROXY header handling; mixed into :class:`farm.smtp.SMTP`."""

    _proxy_timeout: float | None
    _proxy_networks: tuple[Network, ...] | None
    _proxy_parser: ProxyParser | None = None
    _proxy_timer: asyncio.TimerHandle | None = None

    def _expect_proxy_header(self) -> bool:
        """At connection: start waiting for the header. False if the peer was refused."""
        server: Any = self
        session = server.session
        if not peer_trusted(session.peer, self._proxy_networks):
            log.warning("session=%s PROXY header from an untrusted peer refused", session.id)
            server.transport.abort()
            return False
        self._proxy_parser = ProxyParser()
        self._proxy_timer = server.loop.call_later(self._proxy_timeout, self._proxy_header_late)
        return True

    def _proxy_header_late(self) -> None:
        server: Any = self
        if self._proxy_parser is not None and server.transport is not None:
            log.info("session=%s no PROXY header in time: closing", server.session.id)
            self._proxy_parser = None
            server.transport.abort()

    def _feed_proxy_header(self, data: bytes | memoryview) -> None:
        server: Any = self
        parser = self._proxy_parser
        assert parser is not None
        result = parser.feed(data)
        if result is None:
            return
        self._proxy_parser = None
        if self._proxy_timer is not None:
            self._proxy_timer.cancel()
            self._proxy_timer = None
        if not result.valid:
            log.info("session=%s bad PROXY header: %s", server.session.id, result.error)
            server.transport.abort()
            return
        server.session.proxy_data = result
        if server._greeting_delay:
            # The client must wait for the 220: bytes after the header are an early talk.
            server._early_talker_watch = True
            if result.trailing:
                server._early_talker()
                return
        server._framer.feed(result.trailing)  # what followed the header comes first
        server._run(self._accept_proxy(result))
        server._start_timer()  # a hung handle_PROXY is given up like any hung hook

    async def _accept_proxy(self, proxy_data: ProxyData) -> None:
        server: Any = self
        hook = server._hooks.hooks.get("PROXY")
        accepted = False
        if hook is not None:
            try:
                accepted = bool(await hook(server, server.session, server.envelope, proxy_data))
            except Exception:
                log.exception("session=%s handle_PROXY failed", server.session.id)
        if not accepted:
            log.info("session=%s PROXY header not accepted by the handler", server.session.id)
            server._close_after_flush = True
            return
        if await server._admitted():
            server._greet_after_delay()
