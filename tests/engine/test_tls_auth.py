"""STARTTLS, implicit TLS and AUTH, with real certificates (trustme), smtplib and swaks."""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from typing import Any

import pytest

from farm.smtp import AuthResult, LoginPassword, TLSSetupException
from tests.support.client import SMTPClient
from tests.support.loops import both_loops  # noqa: F401  (loop_kind: asyncio and uvloop)


class Authenticator:
    """Accepts user/secret; remembers what it was asked. Async, which aiosmtpd mishandles."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    async def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        await asyncio.sleep(0)
        assert isinstance(data, LoginPassword)
        self.calls.append((mechanism, data.login))
        ok = data.login == b"user" and data.password == b"secret"
        return AuthResult(success=ok, handled=False, auth_data=data.login if ok else None)


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_starttls_then_auth_then_mail(
    make_controller: Any, handler: Any, server_context: Any, client_context: Any
) -> None:
    auth = Authenticator()
    controller = make_controller(handler, tls_context=server_context, authenticator=auth)
    with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
        client.ehlo("me")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")  # never offered over plaintext
        assert client.starttls(context=client_context)[0] == 220
        client.ehlo("me")
        assert not client.has_extn("starttls")
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        client.login("user", "secret")
        client.sendmail("a@b.c", ["d@e.f"], b"over TLS\r\n")
    session = handler.sessions[0]
    assert session.ssl["version"].startswith("TLS")
    assert session.authenticated is True
    assert session.auth_data == b"user"
    assert auth.calls[0][1] == b"user"


def test_auth_login_mechanism(
    make_controller: Any, handler: Any, server_context: Any, client_context: Any
) -> None:
    controller = make_controller(handler, tls_context=server_context, authenticator=Authenticator())
    with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
        client.starttls(context=client_context)
        client.ehlo("me")
        code, _ = client.docmd("AUTH LOGIN")
        assert code == 334
        # The password prompt is aiosmtpd's "Password\\0".
        assert client.docmd(base64.b64encode(b"user").decode()) == (334, b"UGFzc3dvcmQA")
        assert client.docmd(base64.b64encode(b"secret").decode()) == (
            235,
            b"2.7.0 Authentication successful",
        )
        assert client.docmd("AUTH PLAIN") == (503, b"Already authenticated")


def test_auth_refused_over_plaintext(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, authenticator=Authenticator())
    with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
        client.ehlo("me")
        assert not client.has_extn("auth")
        assert client.docmd("AUTH PLAIN " + plain("user", "secret")) == (
            538,
            b"5.7.11 Encryption required for requested authentication mechanism",
        )


def test_auth_errors_and_failure_limit(
    make_controller: Any, handler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    controller = make_controller(handler, auth_require_tls=False, authenticator=Authenticator())
    with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
        assert client.docmd("AUTH PLAIN x")[0] == 503  # before EHLO
        client.ehlo("me")
        assert client.docmd("AUTH FOO") == (504, b"5.5.4 Unrecognized authentication type")
        assert client.docmd("AUTH PLAIN !!!") == (501, b"5.5.2 Can't decode base64")
        assert client.docmd("AUTH PLAIN")[0] == 334
        assert client.docmd("*") == (501, b"5.7.0 Auth aborted")
        assert client.docmd("AUTH PLAIN " + plain("user", "wrong"))[0] == 535
        assert client.docmd("NOOP") == (250, b"OK")
        assert client.docmd("AUTH PLAIN " + plain("user", "wrong2"))[0] == 535
        # The third failure closes the session.
        assert client.docmd("AUTH PLAIN " + plain("user", "wrong3"))[0] == 535
        assert client.getreply()[0] == 421
    assert not any("wrong" in record.getMessage() for record in caplog.records)
    assert not any(plain("user", "wrong") in record.getMessage() for record in caplog.records)


def test_auth_required_blocks_mail(make_controller: Any, handler: Any) -> None:
    controller = make_controller(
        handler, auth_require_tls=False, auth_required=True, authenticator=Authenticator()
    )
    with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
        client.ehlo("me")
        assert client.docmd("MAIL FROM:<a@b>") == (530, b"5.7.0 Authentication required")
        client.login("user", "secret")
        assert client.docmd("MAIL FROM:<a@b>") == (250, b"OK")


def test_handler_auth_mechanism_and_exclusion(make_controller: Any, handler: Any) -> None:
    class WithToken(type(handler)):  # type: ignore[misc]
        async def auth_X__TOKEN(self, server: Any, args: list[str]) -> AuthResult:
            token = await server.challenge_auth("token?")
            return AuthResult(success=token == b"letmein", handled=False)

    controller = make_controller(
        WithToken(), auth_require_tls=False, auth_exclude_mechanism=["LOGIN"]
    )
    with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
        client.ehlo("me")
        assert client.esmtp_features["auth"].split() == ["PLAIN", "X-TOKEN"]
        assert client.docmd("AUTH LOGIN")[0] == 504
        assert client.docmd("AUTH X-TOKEN") == (334, base64.b64encode(b"token?"))
        assert client.docmd(base64.b64encode(b"letmein").decode())[0] == 235


def test_starttls_injection_is_discarded(
    make_controller: Any, handler: Any, server_context: Any, client_context: Any
) -> None:
    controller = make_controller(handler, tls_context=server_context)
    with SMTPClient.of(controller, timeout=10, greeting=True) as client:
        assert client.command("EHLO me").code == 250
        # One write: STARTTLS plus commands that must never run.
        client.send(b"STARTTLS\r\nMAIL FROM:<injected@evil>\r\nEHLO injected\r\n")
        assert client.reply() == "220 Ready to start TLS\r\n"
        client.starttls(client_context, server_hostname="farm.test")
        # Nothing was executed from the plaintext: had it been, its replies would come first
        # (the server answers in order).
        assert client.command("NOOP") == "250 OK\r\n"
        assert client.command("MAIL FROM:<a@b>") == "503 Error: send HELO first\r\n"
        client.send(b"EHLO me\r\nMAIL FROM:<a@b>\r\n")
        assert client.reply().text == "250 HELP"
        assert client.reply() == "250 OK\r\n"


def test_starttls_errors(make_controller: Any, handler: Any, server_context: Any) -> None:
    controller = make_controller(handler, tls_context=server_context, tls_handshake_timeout=1.0)
    with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
        assert client.docmd("STARTTLS now") == (501, b"Syntax: STARTTLS")
    # A client that never starts the handshake is dropped at the handshake timeout.
    with socket.create_connection((controller.hostname, controller.port), timeout=10) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"STARTTLS\r\n")
        assert reader.readline() == b"220 Ready to start TLS\r\n"
        assert raw.recv(1024) == b""  # closed by the server after the timeout


def test_require_starttls(
    make_controller: Any, handler: Any, server_context: Any, client_context: Any
) -> None:
    controller = make_controller(handler, tls_context=server_context, require_starttls=True)
    with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
        client.ehlo("me")
        assert client.docmd("MAIL FROM:<a@b>") == (530, b"Must issue a STARTTLS command first")
        client.starttls(context=client_context)
        client.ehlo("me")
        assert client.docmd("MAIL FROM:<a@b>") == (250, b"OK")


def test_handle_starttls_false_refuses_commands(
    make_controller: Any, server_context: Any, client_context: Any
) -> None:
    class Picky:
        def handle_STARTTLS(self, server: Any, session: Any, envelope: Any) -> bool:
            return False

    controller = make_controller(Picky(), tls_context=server_context)
    with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
        client.starttls(context=client_context)
        assert client.docmd("EHLO me") == (554, b"Command refused due to lack of security")
        assert client.docmd("QUIT")[0] == 221


def test_implicit_tls_counts_as_tls(
    make_controller: Any, handler: Any, server_context: Any, client_context: Any
) -> None:
    controller = make_controller(handler, ssl_context=server_context, authenticator=Authenticator())
    with smtplib.SMTP_SSL(
        controller.hostname, controller.port, context=client_context, timeout=10
    ) as client:
        client.ehlo("me")
        assert not client.has_extn("starttls")
        assert client.has_extn("auth")
        client.login("user", "secret")
        client.sendmail("a@b.c", ["d@e.f"], b"implicit\r\n")
    assert handler.sessions[0].ssl is not None
    assert handler.sessions[0].authenticated


def swaks(controller: Any, *flags: str) -> subprocess.CompletedProcess[str]:
    """Send one message with swaks to the controller; ``flags`` pick TLS and AUTH."""
    server = f"{controller.hostname}:{controller.port}"
    command = ["swaks", "--server", server, *flags, "--to", "a@example.com"]
    command += ["--from", "b@example.com"]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_starttls_and_auth(make_controller: Any, handler: Any, server_context: Any) -> None:
    controller = make_controller(handler, tls_context=server_context, authenticator=Authenticator())
    auth = ("--auth", "PLAIN", "--auth-user", "user", "--auth-password", "secret")
    result = swaks(controller, "--tls", *auth)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0 Authentication successful" in result.stdout
    assert handler.sessions[0].ssl is not None


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_implicit_tls(make_controller: Any, handler: Any, server_context: Any) -> None:
    controller = make_controller(handler, ssl_context=server_context)
    result = swaks(controller, "--tlsc")
    assert result.returncode == 0, result.stdout + result.stderr
    assert handler.sessions[0].ssl is not None


class TLSFailureCatcher:
    """Records what handle_exception is given."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self.reported = threading.Event()

    async def handle_exception(self, error: Exception) -> str:
        self.errors.append(error)
        self.reported.set()
        return "451 never sent: the connection is gone"


def test_failed_starttls_handshake_ends_the_session(
    make_controller: Any, server_context: Any
) -> None:
    catcher = TLSFailureCatcher()
    controller = make_controller(catcher, tls_context=server_context)
    with SMTPClient.of(controller, timeout=10) as client:
        assert client.reply().startswith("220 ")
        assert client.command("EHLO me").code == 250
        assert client.command("STARTTLS") == "220 Ready to start TLS\r\n"
        client.send(b"EHLO this is no TLS ClientHello\r\n")
        assert client.read_to_close() == b""  # closed or aborted, with nothing said
    # handle_exception hears of it, as in aiosmtpd...
    assert catcher.reported.wait(10)
    assert isinstance(catcher.errors[0], TLSSetupException)
    # ...and the session is over for the server too: stop() has nothing to drain (it would
    # otherwise wait its 30 s drain_timeout for a session asyncio never reported closed).
    started = time.monotonic()
    controller.stop()
    assert time.monotonic() - started < 10
