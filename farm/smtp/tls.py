"""STARTTLS (RFC 3207) for the SMTP protocol, through the public ``loop.start_tls``.

Every byte received before the handshake is discarded (CVE-2024-34083 class): pipelined
plaintext after ``STARTTLS`` is never executed. After the handshake the session starts over.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from farm.smtp.help import syntax
from farm.smtp.settings import DEFAULTS

log = logging.getLogger("farm.smtp")

#: Seconds a client has to complete the TLS handshake.
TLS_HANDSHAKE_TIMEOUT_DEFAULT = DEFAULTS.tls_handshake_timeout


def tls_session_info(transport: Any) -> dict[str, Any]:
    """What ``session.ssl`` holds for a TLS transport."""
    ssl_object = transport.get_extra_info("ssl_object")
    return {
        "ssl_object": ssl_object,
        "cipher": transport.get_extra_info("cipher"),
        "peercert": transport.get_extra_info("peercert"),
        "compression": transport.get_extra_info("compression"),
        "version": ssl_object.version() if ssl_object is not None else None,
    }


class TLSSetupException(Exception):
    """The TLS handshake after ``STARTTLS`` failed (passed to ``handle_exception``)."""


class StartTLSMixin:
    """The ``STARTTLS`` command; mixed into :class:`farm.smtp.SMTP`."""

    #: True while a STARTTLS handshake runs (a draining server aborts it: no mail in flight).
    _in_tls_handshake = False

    tls_context: ssl.SSLContext | None
    _tls_protocol: Any
    _tls_handshake_okay: bool
    _tls_handshake_timeout: float

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """STARTTLS"""
        server: Any = self
        if arg:
            server._reply("501 Syntax: STARTTLS")
            return
        if self.tls_context is None:
            server._reply("454 TLS not available")
            return
        if self._tls_protocol is not None:
            server._reply("503 5.5.1 Error: TLS already active")
            return
        server._reply("220 Ready to start TLS")
        server._flush()
        discarded = server._framer.take_buffered()
        session = server.session
        if discarded:
            log.warning(
                "session=%s discarded %d octets sent after STARTTLS before the handshake",
                session.id,
                len(discarded),
            )
        self._in_tls_handshake = True
        try:
            transport = await server.loop.start_tls(
                server.transport,
                server,
                self.tls_context,
                server_side=True,
                ssl_handshake_timeout=self._tls_handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as error:
            reason = str(error) or type(error).__name__
            log.info("session=%s TLS handshake failed: %s", session.id, reason)
            if server.stats is not None:
                server.stats.tls["failed"] += 1
            if server.transport is not None:
                server.transport.abort()
            await self._report_tls_failure(error)
            # asyncio tells only the TLS layer that the connection is gone: end the session.
            server.connection_lost(error)
            return
        finally:
            self._in_tls_handshake = False
        if transport is None:  # the connection closed during the handshake
            server.connection_lost(None)
            return
        server.transport = transport
        if server.stats is not None:
            server.stats.tls["ok"] += 1
        self._tls_protocol = transport.get_extra_info("ssl_object")
        session.ssl = tls_session_info(transport)
        # RFC 3207 4.2: forget everything learnt before TLS, an AUTH included.
        session.host_name = None
        session.extended_smtp = False
        session.authenticated = False
        session.auth_data = None
        server._set_rset_state()
        hook = server._hooks.hooks.get("STARTTLS")
        if hook is not None:
            try:
                self._tls_handshake_okay = bool(hook(server, session, server.envelope))
            except Exception:
                log.exception("session=%s handle_STARTTLS failed", session.id)
                self._tls_handshake_okay = False
        server._update_checks()
        log.info("session=%s TLS established: %s", session.id, session.ssl.get("version"))

    async def _report_tls_failure(self, error: BaseException) -> None:
        """Tell the handler's ``handle_exception`` (as aiosmtpd does); the connection is gone,
        so whatever it returns is not sent."""
        server: Any = self
        if server._hooks.handle_exception is None:
            return
        failure = TLSSetupException(str(error) or type(error).__name__)
        failure.__cause__ = error
        await server._handle_exception(failure)
