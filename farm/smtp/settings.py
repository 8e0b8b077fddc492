"""The engine's keywords and their defaults: the one place an engine default is written.

``farm.smtp.SMTP(handler, **keywords)`` takes these keywords (aiosmtpd's names, plus the farm's
own); its signature's defaults are read from :data:`DEFAULTS`, and ``farm.config``'s ``[smtp]``
table starts from them too, stating only the farm's deliberate overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Every keyword of ``SMTP(...)`` with its default (aiosmtpd's where aiosmtpd has it)."""

    #: Largest message (SIZE); None or 0: no limit.
    data_size_limit: int | None = 2**25
    enable_SMTPUTF8: bool = False
    #: Non-ASCII addresses only valid UTF-8 and in a transaction whose MAIL has SMTPUTF8
    #: (else 500 5.5.2 / 553 5.6.7, as Postfix); off, as aiosmtpd takes them as they come.
    strict_smtputf8: bool = False
    decode_data: bool = False
    #: Name in the greeting and the EHLO reply (None: the host's FQDN).
    hostname: str | None = None
    #: Identification after the host name in the greeting (None: "Python SMTP farm <version>").
    ident: str | None = None
    tls_context: Any = None
    require_starttls: bool = False
    #: Idle seconds before a session is closed with 421 (None or 0: never).
    timeout: float | None = 300.0
    auth_required: bool = False
    auth_require_tls: bool = True
    auth_exclude_mechanism: Any = None
    auth_callback: Any = None
    #: Calls of one verb per session (an int, or a dict of verbs with a "*" default).
    command_call_limit: int | dict[str, int] | None = None
    authenticator: Any = None
    #: Seconds to wait for a PROXY header (None: no PROXY protocol).
    proxy_protocol_timeout: float | None = None
    #: Deprecated by aiosmtpd; accepted and ignored.
    loop: Any = None
    pipelining: bool = False
    #: Recipients per transaction (RFC 5321 4.5.3.1.8 requires at least 100).
    max_recipients: int | None = 1000
    #: Octets per second a DATA/BDAT body must keep up (each part extends its deadline).
    min_data_rate: float = 500.0
    enhanced_status_codes: bool = False
    chunking: bool = False
    dsn: bool = False
    #: Peers allowed to send a PROXY header (None: every peer).
    proxy_trusted_networks: Any = None
    #: Seconds of silence before the greeting (early talkers are refused).
    greeting_delay: float = 0.0
    #: A client that sends on before a reply it must wait for (RFC 2920: after EHLO, HELO, LHLO,
    #: DATA, VRFY, EXPN, NOOP, TURN; after any command when PIPELINING is not in effect) gets
    #: 554 5.5.0 and is closed, as Postfix's smtpd_forbid_unauth_pipelining; off, as aiosmtpd.
    forbid_unauth_pipelining: bool = False
    tls_handshake_timeout: float = 30.0
    #: Failed AUTH attempts per session before it is closed.
    auth_failure_limit: int = 3
    #: A per-IP limiter (farm.smtp.limiter.Limiter); None: no per-IP limits.
    limiter: Any = None
    #: Unknown commands a session may send; the last one is answered 502 and closes.
    unknown_command_limit: int = 5
    #: Bodies past this many octets go to a spool file (None: all kept in memory).
    spool_threshold: int | None = 1 << 20
    spool_directory: str | None = None
    body_budget: Any = None
    stages: Any = None
    #: Postfix's error limits (farm.smtp.error_limits); 0 switches one off.
    soft_error_limit: int = 0
    hard_error_limit: int = 0
    junk_command_limit: int = 0
    error_sleep_time: float = 1.0

    @classmethod
    def names(cls) -> frozenset[str]:
        """The keywords ``SMTP(...)`` takes after the handler."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    def keywords(self) -> dict[str, Any]:
        """These settings as keyword arguments for ``SMTP(handler, **keywords)``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


#: The engine's defaults.
DEFAULTS = EngineSettings()
