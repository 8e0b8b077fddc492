"""Engine holes from the port-25 review (issue 12): a BDAT refused by a policy check before the
command ran, AUTH state across STARTTLS, and a client that pipelines without reading.

Real Controllers on loopback, raw sockets or smtplib; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import smtplib
import threading
import time
from typing import Any

import pytest

from farm.smtp import SMTP
from tests.engine.test_hostile import TIMEOUT, _shrink_server_buffers
from tests.engine.test_tls_auth import Authenticator
from tests.support.client import SMTPClient, codes
from tests.support.loops import both_loops  # noqa: F401  (loop_kind: asyncio and uvloop)
from tests.support.wait import wait_for

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
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
        client.send(b"EHLO me\r\nBDAT 6 LAST\r\n" + CHUNK + b"NOOP\r\n")
        replies = [client.reply() for _ in range(4)]
        assert codes(replies) == [220, 250, 530, 250], replies
        assert client.command(b"QUIT").code == 221
    assert handler.envelopes == []


def test_bdat_refused_by_a_policy_check_without_a_size_closes(
    make_controller: Any, handler: Any, server_context: Any
) -> None:
    controller = make_controller(
        handler, chunking=True, tls_context=server_context, require_starttls=True
    )
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
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


#: A pipelined flood whose replies are ~10 times its size (the EHLO reply lists extensions).
EHLO_FLOOD = b"EHLO x\r\n" * 50_000  # 400 kB


def _flooded(make_controller: Any, handler: Any, **kwargs: Any) -> tuple[SMTPClient, Any]:
    """A client that pipelines the EHLO flood without reading, and the server's protocol."""
    controller = make_controller(
        handler, pipelining=True, chunking=True, enhanced_status_codes=True, dsn=True, **kwargs
    )
    client = SMTPClient.of(controller, timeout=TIMEOUT, small_buffers=True)
    assert client.reply().code == 220
    protocol = _shrink_server_buffers(controller)
    threading.Thread(target=_send_quietly, args=(client, EHLO_FLOOD), daemon=True).start()
    return client, protocol


def _send_quietly(client: SMTPClient, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the server may drop us meanwhile
        client.send(data)


def test_pipelined_flood_of_a_non_reader_holds_bounded_replies(
    make_controller: Any, handler: Any
) -> None:
    client, protocol = _flooded(make_controller, handler)
    with client:
        wait_for(lambda: not protocol.transport.is_reading(), "the server to stop reading")
        held = protocol.transport.get_write_buffer_size()
        # Before: one read of 64 KiB of EHLOs became ~800 kB of replies in one write.
        assert held < 128 * 1024, held
        assert protocol._framer.buffered < 512 * 1024
        # It still answers every command, in order, once the client reads.
        client.sock.settimeout(TIMEOUT)
        replies = 0
        while replies < 50_000:
            reply = client.reply()
            assert reply.lines[0].startswith("250-farm.test"), reply
            replies += 1


def test_a_client_that_never_reads_is_dropped_at_the_stall_limit(
    make_controller: Any, handler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SMTP, "write_stall_limit", 1.0, raising=False)
    client, protocol = _flooded(make_controller, handler, timeout=300)
    with client:
        wait_for(lambda: not protocol.transport.is_reading(), "the server to stop reading")
        started = time.monotonic()
        wait_for(lambda: protocol.transport is None, "the connection to be dropped", 10.0)
        assert time.monotonic() - started >= 0.5
