"""SMTP AUTH (RFC 4954): the ``AUTH`` command's rules, the SASL exchange, PLAIN and LOGIN.

:class:`farm.smtp.SMTP` keeps aiosmtpd's methods (``smtp_AUTH``, ``challenge_auth``,
``auth_PLAIN``, ``auth_LOGIN``, a subclass's ``auth_FOO``) and delegates here: the command's
refusals and parsing, what a mechanism's result means, the ``334`` exchange over a
:class:`SaslChannel`, and the credential check.

Credentials are checked by ``authenticator(server, session, envelope, mechanism, auth_data)``
(sync or async, returning an :class:`AuthResult`) or by the deprecated
``auth_callback(mechanism, login, password) -> bool``. No AUTH line ever reaches a log.
"""

from __future__ import annotations

import binascii
import inspect
import logging
import warnings
from base64 import b64decode, b64encode
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from farm.smtp.auth import AuthResult, LoginPassword
from farm.smtp.hooks import MISSING
from farm.smtp.session import Envelope, Session
from farm.smtp.settings import DEFAULTS
from farm.smtp.state import ConnectionState

log = logging.getLogger("farm.smtp")

#: Failed AUTH attempts a session may make; the next failure closes it with 421.
AUTH_FAILURE_LIMIT_DEFAULT = DEFAULTS.auth_failure_limit
#: RFC 4954 4: an AUTH command or SASL response line may be this long.
SASL_LINE_LIMIT = 12288


def server_mechanisms(cls: type) -> dict[str, str]:
    """``{mechanism name: method name}`` of the ``auth_*`` methods of an SMTP class (PLAIN,
    LOGIN, and any a subclass adds), computed once per class."""
    table = cls.__dict__.get("_mechanism_table_cache")
    if table is None:
        table = {}
        for attr in dir(cls):
            if attr.startswith("auth_") and callable(getattr(cls, attr, None)):
                name = getattr(getattr(cls, attr), "__auth_mechanism_name__", None)
                table[(name or attr[5:].replace("__", "-")).upper()] = attr
        type.__setattr__(cls, "_mechanism_table_cache", table)  # this class only
    return table


AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_ABORTED = "501 5.7.0 Auth aborted"
BAD_BASE64 = "501 5.5.2 Can't decode base64"
CANNOT_SPLIT = "501 5.5.2 Can't split auth value"
UNRECOGNIZED = "504 5.5.4 Unrecognized authentication type"
LINE_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"
TOO_MANY_FAILURES = "421 4.7.0 Too many failed authentication attempts, goodbye"
ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"


class AuthAborted(Exception):
    """The client cancelled or garbled the exchange; the reply was already sent."""


# -- the command -----------------------------------------------------------------------------


class AuthRequest(NamedTuple):
    """``AUTH <mechanism> [initial-response]``: the mechanism upper-cased, and the arguments
    as sent (what ``handle_AUTH`` and the mechanism get)."""

    mechanism: str
    args: list[str]


def parse_auth(
    arg: str | None,
    *,
    helo: bool,
    esmtp: bool,
    tls_missing: bool,
    authenticated: bool,
    in_transaction: bool,
) -> AuthRequest | str:
    """The request, or the reply refusing it, in aiosmtpd's order: EHLO first, encryption
    (``tls_missing``: TLS is required and not active), not twice, not in a transaction,
    then the arguments."""
    if not helo:
        return "503 Error: send EHLO first"
    if not esmtp:
        return "500 Error: command 'AUTH' not recognized"
    if tls_missing:
        return ENCRYPTION_REQUIRED
    if authenticated:
        return "503 Already authenticated"
    if in_transaction:
        return "503 5.5.1 Error: AUTH not permitted during a mail transaction"
    if not arg:
        return "501 Not enough value"
    args = arg.split()
    if len(args) > 2:
        return "501 Too many values"
    return AuthRequest(args[0].upper(), args)


class AuthOutcome(NamedTuple):
    """What a mechanism's result means (:func:`auth_outcome`)."""

    success: bool
    #: On failure: the mechanism already replied (nothing more is sent).
    handled: bool
    #: The reply instead of the default one.
    message: str | None
    #: What ``session.auth_data`` and ``session.login_data`` become on success.
    auth_data: Any
    login_data: Any


def auth_outcome(result: Any) -> AuthOutcome:
    """A mechanism's (not None) result, with aiosmtpd's meanings: an :class:`AuthResult`; or,
    the older style, the session's login data on success, ``MISSING`` or ``False`` on failure.
    (None means the mechanism answered the client itself: nothing to apply.)"""
    if isinstance(result, AuthResult):
        login_data = getattr(result.auth_data, "login", None)
        return AuthOutcome(
            result.success, result.handled, result.message, result.auth_data, login_data
        )
    success = result is not MISSING and result is not False
    return AuthOutcome(success, False, None, result, result)


def count_failure(state: ConnectionState, limit: int) -> bool:
    """Count a failed AUTH exchange in the session's ``state``; True when that failure is
    the ``limit``-th, which ends the session (``421``)."""
    state.auth_failures += 1
    return state.auth_failures >= limit


# -- the exchange ----------------------------------------------------------------------------


class SaslChannel(Protocol):
    """What the exchange needs of the session: queue a reply, send what is queued, read the
    client's next line (None: too long; ConnectionAbortedError: the client closed)."""

    def _reply(self, text: str, plain: bool = ...) -> None: ...

    def _flush(self) -> None: ...

    async def _read_line(self) -> bytes | None: ...


def decode(text: bytes | str) -> bytes | None:
    """Strict base64; None when ``text`` is not."""
    try:
        return b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def decode_or_refuse(channel: SaslChannel, text: bytes | str) -> bytes:
    """:func:`decode`, or reply ``501`` and raise :class:`AuthAborted`."""
    data = decode(text)
    if data is None:
        channel._reply(BAD_BASE64)
        raise AuthAborted
    return data


async def challenge(
    channel: SaslChannel, challenge: str | bytes, encode: bool = True, warn_logging: bool = False
) -> bytes:
    """Send ``334 <challenge>`` and return the client's decoded response.

    Raises :class:`AuthAborted` (after replying, unless the client is gone) when the client
    aborts with ``*``, sends bad base64 or a line too long, or closes.
    """
    data = challenge.encode() if isinstance(challenge, str) else challenge
    text = b64encode(data).decode() if encode else data.decode()
    channel._reply(f"334 {text}")
    channel._flush()
    try:
        line = await channel._read_line()
    except ConnectionAbortedError:
        raise AuthAborted from None  # the client is gone: nothing to answer
    if warn_logging:
        warnings.warn("AUTH interaction logging is enabled!", stacklevel=3)
        warnings.warn("Sensitive information might be leaked!", stacklevel=3)
    if line is None:
        channel._reply(LINE_TOO_LONG)
        raise AuthAborted
    if line == b"*":
        channel._reply(AUTH_ABORTED)
        raise AuthAborted
    return decode_or_refuse(channel, line)


def split_plain(response: bytes) -> LoginPassword | None:
    """RFC 4616 PLAIN's ``authzid NUL authcid NUL passwd``; None unless exactly three parts."""
    parts = response.split(b"\x00")
    if len(parts) != 3:
        return None
    _, login, password = parts
    return LoginPassword(login, password)


async def plain_exchange(channel: SaslChannel, args: list[str]) -> LoginPassword:
    """PLAIN's credentials: from the initial response (``=``: an empty one), else asked for."""
    if len(args) == 1:
        response = await challenge(channel, b"")
    elif args[1] == "=":
        response = b""
    else:
        response = decode_or_refuse(channel, args[1])
    credentials = split_plain(response)
    if credentials is None:
        channel._reply(CANNOT_SPLIT)
        raise AuthAborted
    return credentials


async def login_exchange(
    channel: SaslChannel, args: list[str], username_prompt: str, password_prompt: str
) -> LoginPassword:
    """LOGIN's credentials: the user name (given at once, or asked for), then the password."""
    if len(args) == 2:
        login = decode_or_refuse(channel, args[1])
    else:
        login = await challenge(channel, username_prompt)
    password = await challenge(channel, password_prompt)
    return LoginPassword(login, password)


async def check_credentials(
    authenticator: Callable[..., Any] | None,
    auth_callback: Callable[..., Any] | None,
    server: Any,
    session: Session,
    envelope: Envelope,
    mechanism: str,
    credentials: LoginPassword,
) -> AuthResult:
    """Ask the ``authenticator`` (else the deprecated ``auth_callback``) about credentials.

    A bare truthy/falsy answer becomes an :class:`AuthResult`; a success without
    ``auth_data`` gets the credentials. With neither configured, every attempt fails.
    """
    if authenticator is not None:
        result = authenticator(server, session, envelope, mechanism, credentials)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, AuthResult):
            result = AuthResult(success=bool(result), handled=False)
        if result.success and result.auth_data is None:
            result.auth_data = credentials
        return result
    if auth_callback is not None:
        ok = auth_callback(mechanism, credentials.login, credentials.password)
        if inspect.isawaitable(ok):
            ok = await ok
        return AuthResult(success=bool(ok), handled=False, auth_data=credentials)
    log.warning("session=%s AUTH attempted but no authenticator is configured", session.id)
    return AuthResult(success=False, handled=False)
