"""SMTP AUTH (RFC 4954): the ``AUTH`` command, PLAIN and LOGIN, and handler mechanisms.

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
from typing import Any

from farm.smtp.auth import AuthResult, LoginPassword
from farm.smtp.help import syntax
from farm.smtp.hooks import MISSING
from farm.smtp.limiter import too_many_auth_failures
from farm.smtp.settings import DEFAULTS

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


class _Aborted(Exception):
    """The client cancelled or garbled the exchange; the reply was already sent."""


class AuthMixin:
    """The ``AUTH`` command; mixed into :class:`farm.smtp.SMTP`."""

    _auth_failures: int
    _auth_failure_limit: int
    #: The LOGIN mechanism's prompts (aiosmtpd's texts; a subclass may change them).
    AuthLoginUsernameChallenge = "User Name\x00"
    AuthLoginPasswordChallenge = "Password\x00"

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str | None) -> None:
        """AUTH <mechanism>"""
        server: Any = self
        session = server.session
        if not session.host_name:
            server._reply("503 Error: send EHLO first")
            return
        if not session.extended_smtp:
            server._reply("500 Error: command 'AUTH' not recognized")
            return
        if server._auth_require_tls and server._tls_protocol is None:
            server._reply("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if session.authenticated:
            server._reply("503 Already authenticated")
            return
        if server.envelope.mail_from is not None:
            server._reply("503 5.5.1 Error: AUTH not permitted during a mail transaction")
            return
        if not arg:
            server._reply("501 Not enough value")
            return
        args = arg.split()
        if len(args) > 2:
            server._reply("501 Too many values")
            return
        mechanism = args[0].upper()
        if server._limit_key is not None and not await self._auth_rate_allowed():
            return
        if "AUTH" in server._hooks.hooks:
            status = await server._call_handler_hook("AUTH", args)
            if status is not MISSING:
                server._reply(status)
                return
        method = self._mechanism(mechanism)
        if method is None:
            server._reply("504 5.5.4 Unrecognized authentication type")
            return
        try:
            result = method(server, args)
            if inspect.isawaitable(result):
                result = await result
        except _Aborted:
            return  # the reply is sent; only a credential check counts as a failure
        self._finish_auth(mechanism, result)

    async def _auth_rate_allowed(self) -> bool:
        """The client's AUTH-failure allowance (``limiter``): False after replying 454."""
        server: Any = self
        limiter, key = server._limiter, server._limit_key
        if not limiter.counts_auth or await limiter.auth_allowed(key):
            return True
        log.info("session=%s AUTH refused: too many AUTH failures from %s", server.session.id, key)
        if server.stats is not None:
            server.stats.limited["auth"] += 1
        server._reply(too_many_auth_failures(key))
        return False

    def _mechanism(self, name: str) -> Any:
        server: Any = self
        if name in server._auth_exclude_mechanism:
            return None
        handler_method = server._hooks.auth_mechanisms.get(name)
        if handler_method is not None:
            return handler_method
        method_name = server_mechanisms(type(self)).get(name)
        return None if method_name is None else getattr(self, method_name)

    def _finish_auth(self, mechanism: str, result: Any) -> None:
        """Apply a mechanism's outcome, with aiosmtpd's meanings of its return values.

        An :class:`AuthResult`; or (the older style) the session's login data on success,
        ``MISSING`` or ``False`` on failure, ``None`` when the mechanism replied itself.
        """
        server: Any = self
        session = server.session
        if result is None:
            return  # the mechanism answered the client itself; nothing to add or count
        if isinstance(result, AuthResult):
            success, handled, message = result.success, result.handled, result.message
            auth_data = result.auth_data
            login_data = getattr(auth_data, "login", None)
        else:
            success = result is not MISSING and result is not False
            handled, message, auth_data = False, None, result
            login_data = result
        if server.stats is not None:
            server.stats.auth["success" if success else "failure"] += 1
        if success:
            if server._limit_key is not None and server._limiter.counts_auth:
                server._limiter.auth_succeeded(server._limit_key)
            session.authenticated = True
            session.auth_data = auth_data
            session.login_data = login_data
            server._reply(message or AUTH_OK)
            log.info("session=%s authenticated with %s", session.id, mechanism)
            return
        self._auth_failures += 1
        log.info(
            "session=%s AUTH %s failed (%d of %d)",
            session.id,
            mechanism,
            self._auth_failures,
            self._auth_failure_limit,
        )
        if not handled:
            server._reply(message or AUTH_FAILED)
        if self._auth_failures >= self._auth_failure_limit:
            server._reply("421 4.7.0 Too many failed authentication attempts, goodbye")
            server._close_after_flush = True

    # -- the exchange ----------------------------------------------------------------------

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> Any:
        """Send a ``334`` challenge and return the client's decoded response (aiosmtpd API).

        Returns :data:`MISSING` after replying, when the client aborts or sends bad base64.
        ``log_client_response=True`` warns as aiosmtpd does, but farm still never logs the
        response: it may be a secret.
        """
        try:
            return await self._challenge(challenge, encode_to_b64, log_client_response)
        except _Aborted:
            return MISSING

    async def _challenge(
        self, challenge: str | bytes, encode: bool = True, warn_logging: bool = False
    ) -> bytes:
        server: Any = self
        data = challenge.encode() if isinstance(challenge, str) else challenge
        text = b64encode(data).decode() if encode else data.decode()
        server._reply(f"334 {text}")
        server._flush()
        try:
            line = await server._read_line()
        except ConnectionAbortedError:
            raise _Aborted from None  # the client is gone: nothing to answer
        if warn_logging:
            warnings.warn("AUTH interaction logging is enabled!", stacklevel=3)
            warnings.warn("Sensitive information might be leaked!", stacklevel=3)
        if line is None:
            server._reply("500 5.5.6 Authentication exchange line is too long")
            raise _Aborted
        if line == b"*":
            server._reply(AUTH_ABORTED)
            raise _Aborted
        return self._decode(line)

    def _decode(self, text: bytes | str) -> bytes:
        try:
            return b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            server: Any = self
            server._reply(BAD_BASE64)
            raise _Aborted from None

    async def _authenticate(self, mechanism: str, credentials: LoginPassword) -> AuthResult:
        server: Any = self
        authenticator = server._authenticator
        if authenticator is not None:
            result = authenticator(server, server.session, server.envelope, mechanism, credentials)
            if inspect.isawaitable(result):
                result = await result
            if not isinstance(result, AuthResult):
                result = AuthResult(success=bool(result), handled=False)
            if result.success and result.auth_data is None:
                result.auth_data = credentials
            return result
        callback = server._auth_callback
        if callback is not None:
            ok = callback(mechanism, credentials.login, credentials.password)
            if inspect.isawaitable(ok):
                ok = await ok
            return AuthResult(success=bool(ok), handled=False, auth_data=credentials)
        log.warning(
            "session=%s AUTH attempted but no authenticator is configured", server.session.id
        )
        return AuthResult(success=False, handled=False)

    async def auth_PLAIN(self, server: Any, args: list[str]) -> AuthResult:
        """RFC 4616 PLAIN: ``AUTH PLAIN [initial-response]``."""
        if len(args) == 1:
            response = await self._challenge(b"")
        elif args[1] == "=":
            response = b""
        else:
            response = self._decode(args[1])
        parts = response.split(b"\x00")
        if len(parts) != 3:
            server._reply("501 5.5.2 Can't split auth value")
            raise _Aborted
        _, login, password = parts
        return await self._authenticate("PLAIN", LoginPassword(login, password))

    async def auth_LOGIN(self, server: Any, args: list[str]) -> AuthResult:
        """The LOGIN mechanism: user name and password, each asked for (or given at once)."""
        if len(args) == 2:
            login = self._decode(args[1])
        else:
            login = await self._challenge(self.AuthLoginUsernameChallenge)
        password = await self._challenge(self.AuthLoginPasswordChallenge)
        return await self._authenticate("LOGIN", LoginPassword(login, password))
