"""STARTTLS's refusals and what a session forgets on the upgrade (farm.smtp.tls); who may send
a PROXY header (farm.smtp.proxy). No socket."""

from __future__ import annotations

from typing import Any

import pytest

from farm.smtp.proxy import parse_networks, peer_trusted
from farm.smtp.session import Session
from farm.smtp.tls import TLSSetupException, forget_before_tls, setup_exception, starttls_refusal


@pytest.mark.parametrize(
    ("arg", "context", "on_tls", "reply"),
    [
        (None, True, False, None),
        ("", True, False, None),
        ("now", True, False, "501 Syntax: STARTTLS"),
        ("now", False, True, "501 Syntax: STARTTLS"),  # the syntax first
        (None, False, False, "454 TLS not available"),
        (None, False, True, "454 TLS not available"),
        (None, True, True, "503 5.5.1 Error: TLS already active"),
    ],
)
def test_starttls_refusal(arg: str | None, context: bool, on_tls: bool, reply: str | None) -> None:
    assert starttls_refusal(arg, context, on_tls) == reply


def test_the_session_starts_over_after_tls() -> None:
    session = Session(None)
    session.host_name, session.extended_smtp = "client.example", True
    session.authenticated, session.auth_data = True, object()
    session.peer = ("192.0.2.1", 25)
    forget_before_tls(session)
    assert (session.host_name, session.extended_smtp) == (None, False)
    assert (session.authenticated, session.auth_data) == (False, None)
    assert session.peer == ("192.0.2.1", 25)


@pytest.mark.parametrize(
    ("error", "text"),
    [(OSError("handshake failed"), "handshake failed"), (TimeoutError(), "TimeoutError")],
)
def test_setup_exception(error: BaseException, text: str) -> None:
    failure = setup_exception(error)
    assert isinstance(failure, TLSSetupException)
    assert (str(failure), failure.__cause__) == (text, error)


@pytest.mark.parametrize(
    ("peer", "networks", "trusted"),
    [
        (("10.1.2.3", 25), None, True),  # no list: every peer
        ("/run/smtp.sock", None, True),
        (("10.1.2.3", 25), ["10.0.0.0/8"], True),
        (("11.1.2.3", 25), ["10.0.0.0/8"], False),
        (("::ffff:10.1.2.3", 25, 0, 0), ["10.0.0.0/8"], True),  # IPv4-mapped
        (("fe80::1%eth0", 25, 0, 2), ["fe80::/10"], True),  # a scope id
        (("::1", 25, 0, 0), ["127.0.0.1", "::1"], True),
        (("2001:db8::1", 25, 0, 0), ["127.0.0.1"], False),
        ("/run/smtp.sock", ["0.0.0.0/0"], False),  # a Unix socket has no address
        (None, ["0.0.0.0/0"], False),
        (("not-an-address", 25), ["0.0.0.0/0"], False),
        (("10.1.2.3", 25), [], False),
    ],
)
def test_peer_trusted(peer: Any, networks: list[str] | None, trusted: bool) -> None:
    assert peer_trusted(peer, parse_networks(networks)) is trusted


def test_parse_networks_takes_host_bits() -> None:
    assert [str(n) for n in parse_networks(["10.1.2.3/8", "::1"]) or ()] == [
        "10.0.0.0/8",
        "::1/128",
    ]
