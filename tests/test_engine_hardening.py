"""Engine holes from the port-25 review (issue 12): a BDAT refused by a policy check before the
command ran, AUTH state across STARTTLS, and a client that pipelines without reading.

Real Controllers on loopback, raw sockets or smtplib; every wait is bounded.
"""

from __future__ import annotations

import smtplib
import ssl
from typing import Any

import pytest
import trustme

from tests.loops import both_loops  # noqa: F401  (loop_kind: asyncio and uvloop)
from tests.test_hostile import Client, codes
from tests.test_tls_auth import Authenticator


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("farm.test", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


# -- a BDAT refused before smtp_BDAT: its chunk is consumed ------------------------------------

#: A chunk whose octets read as commands: were it parsed, QUIT would end the session.
CHUNK = b"QUIT\r\n"


@pytest.mark.parametrize("policy", ["require_starttls", "auth_required"])
def test_bdat_refused_by_a_policy_check_consumes_its_chunk(
    make_controller: Any, handler: Any, server_context: Any, policy: str
) -> None:
    kwargs: dict[str, Any] = {"chunking": True}
    if policy == "require_starttls":
        kwargs.update(tls_context=server_context, require_starttls=True)
    else:
        kwargs.update(auth_required=True, auth_require_tls=False, authenticator=Authenticator())
    controller = make_controller(handler, **kwargs)
    with Client(controller) as client:
        client.send(b"EHLO me\r\nBDAT 6 LAST\r\n" + CHUNK + b"NOOP\r\n")
        replies = [client.reply() for _ in range(4)]
        assert codes(replies) == [220, 250, 530, 250], replies
        assert client.cmd(b"QUIT").code == 221
    assert handler.envelopes == []


def test_bdat_refused_by_a_policy_check_without_a_size_closes(
    make_controller: Any, handler: Any, server_context: Any
) -> None:
    controller = make_controller(
        handler, chunking=True, tls_context=server_context, require_starttls=True
    )
    with Client(controller) as client:
        client.send(b"EHLO me\r\nBDAT LAST\r\n" + CHUNK)
        assert codes(client.replies_until_close()) == [220, 250, 530]


# -- AUTH does not survive STARTTLS -------------------------------------------------------------


def test_auth_state_is_forgotten_at_starttls(
    make_controller: Any, handler: Any, server_context: Any, client_context: Any
) -> None:
    controller = make_controller(
        handler,
        tls_context=server_context,
        auth_required=True,
        auth_require_tls=False,
        authenticator=Authenticator(),
    )
    with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
        client.ehlo("me")
        client.login("user", "secret")  # in plaintext (auth_require_tls=False)
        assert client.starttls(context=client_context)[0] == 220
        client.ehlo("me")
        assert client.docmd("MAIL FROM:<a@b>") == (530, b"5.7.0 Authentication required")
        client.login("user", "secret")  # again, over TLS: not "503 Already authenticated"
        client.sendmail("a@b", ["c@d"], b"Subject: x\r\n\r\nhi\r\n")
    (session,) = handler.sessions
    assert session.authenticated is True and session.ssl is not None


# -- a client that pipelines but never reads ----------------------------------------------------
