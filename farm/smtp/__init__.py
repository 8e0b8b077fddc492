"""The SMTP engine: an aiosmtpd-compatible asyncio server (``farm.smtp.SMTP``)."""

from farm.smtp.auth import AuthResult, LoginPassword, auth_mechanism
from farm.smtp.help import syntax
from farm.smtp.server import (
    BOGUS_LIMIT,
    CALL_LIMIT_DEFAULT,
    DATA_SIZE_DEFAULT,
    MISSING,
    SMTP,
    __ident__,
)
from farm.smtp.session import Envelope, Session
from farm.smtp.tls import TLSSetupException
from farm.smtp.version import __version__

__all__ = [
    "BOGUS_LIMIT",
    "CALL_LIMIT_DEFAULT",
    "DATA_SIZE_DEFAULT",
    "MISSING",
    "SMTP",
    "AuthResult",
    "Envelope",
    "LoginPassword",
    "Session",
    "TLSSetupException",
    "__ident__",
    "__version__",
    "auth_mechanism",
    "syntax",
]
