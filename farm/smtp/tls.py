"""STARTTLS (RFC 3207): the command's refusals, what a session forgets on the upgrade, what it
records of the TLS layer. :class:`farm.smtp.SMTP` runs the handshake (``loop.start_tls``).

Every byte received before the handshake is discarded (CVE-2024-34083 class): pipelined
plaintext after ``STARTTLS`` is never executed. After the handshake the session starts over.
"""

from __future__ import annotations

import ssl
from typing import Any

from farm.smtp.session import Session
from farm.smtp.settings import DEFAULTS

#: Seconds a client has to complete the TLS handshake.
TLS_HANDSHAKE_TIMEOUT_DEFAULT = DEFAULTS.tls_handshake_timeout
#: How a handshake fails: the session ends (the handler's ``handle_exception`` is told).
HANDSHAKE_ERRORS = (OSError, ssl.SSLError, TimeoutError, ConnectionError)


def starttls_refusal(arg: str | None, has_context: bool, on_tls: bool) -> str | None:
    """The reply refusing ``STARTTLS [arg]``, or None to go ahead (``220``, the handshake)."""
    if arg:
        return "501 Syntax: STARTTLS"
    if not has_context:
        return "454 TLS not available"
    if on_tls:
        return "503 5.5.1 Error: TLS already active"
    return None


def forget_before_tls(session: Session) -> None:
    """RFC 3207 4.2: after the handshake, forget what the client said before it (HELO/EHLO,
    an AUTH included); the envelope is reset by the protocol."""
    session.host_name = None
    session.extended_smtp = False
    session.authenticated = False
    session.auth_data = None


def failure_reason(error: BaseException) -> str:
    """A failed handshake's reason, for the log and the handler (never empty)."""
    return str(error) or type(error).__name__


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


def setup_exception(error: BaseException) -> TLSSetupException:
    """What ``handle_exception`` is given for a failed handshake (its cause: ``error``)."""
    failure = TLSSetupException(failure_reason(error))
    failure.__cause__ = error
    return failure
