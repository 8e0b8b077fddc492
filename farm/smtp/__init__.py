"""The SMTP engine: an aiosmtpd-compatible asyncio server (``farm.smtp.SMTP``)."""

from farm.smtp.auth import AuthResult, LoginPassword, auth_mechanism
from farm.smtp.server import (
    BOGUS_LIMIT,
    CALL_LIMIT_DEFAULT,
    DATA_SIZE_DEFAULT,
    MISSING,
    SMTP,
)
from farm.smtp.session import Envelope, Session

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
    "auth_mechanism",
]
