"""Connections to a next hop are capped (issue 12 item 5): at most ``max_connections`` per next
hop per worker, one more waited for at most ``connection_wait`` seconds, else
``451 4.4.5``; a connection is taken only for a recipient that passed our own checks, and not
held for recipients the next hop refused.

Postfix's ``smtp-sink`` is the next hop, behind a TCP proxy that counts the connections the
relay opens; clients are smtplib over loopback; waits are bounded.
"""

from __future__ import annotations

import smtplib
import threading
import time
from typing import Any

import pytest

from farm.relay import Relay
from tests.support.relay import (
    DOMAIN,
    HAVE_SINK,
    CountingProxy,
    LoopThread,
    make_relay,
    message,
)
from tests.support.wait import WAIT

pytestmark = pytest.mark.skipif(not HAVE_SINK, reason="Postfix smtp-sink not installed")


def client_at(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=WAIT)
    client.ehlo("client.test")
    assert client.mail("a@ext.test")[0] == 250
    return client


def test_the_default_cap() -> None:
    assert Relay("127.0.0.1:25", domains=[DOMAIN]).max_connections == 20


def test_connections_beyond_the_cap_get_451_4_4_5(
    serve: Any, sink: Any, loop_thread: LoopThread
) -> None:
    proxy = CountingProxy(loop_thread, sink().port)
    relay = make_relay(proxy.next_hop, max_connections=2, connection_wait=0.5)
    controller = serve(relay)
    holders = [client_at(controller.port) for _ in range(2)]
    try:
        for client in holders:  # each holds a next-hop connection for its transaction
            assert client.rcpt(f"r@{DOMAIN}")[0] == 250
        with client_at(controller.port) as third:
            started = time.monotonic()
            code, text = third.rcpt(f"r@{DOMAIN}")
            assert (code, text[:5]) == (451, b"4.4.5"), text
            assert time.monotonic() - started >= 0.45  # it waited for a free connection
            assert proxy.accepted == 2
            # One holder finishes: its connection goes back to the pool, and is reused.
            assert holders[0].data(message("first"))[0] == 250
            assert third.rcpt(f"r@{DOMAIN}")[0] == 250
            assert third.data(message("third"))[0] == 250
        assert proxy.accepted == 2
    finally:
        for client in holders:
            client.close()


def test_a_recipient_waits_for_a_connection_within_the_bound(
    serve: Any, sink: Any, loop_thread: LoopThread
) -> None:
    proxy = CountingProxy(loop_thread, sink().port)
    controller = serve(make_relay(proxy.next_hop, max_connections=1, connection_wait=WAIT))
    with client_at(controller.port) as holder, client_at(controller.port) as waiting:
        assert holder.rcpt(f"r@{DOMAIN}")[0] == 250
        result: list[Any] = []
        thread = threading.Thread(
            target=lambda: result.append(waiting.rcpt(f"r@{DOMAIN}")), daemon=True
        )
        thread.start()
        thread.join(0.3)
        assert thread.is_alive() and result == []  # waiting, not refused
        assert holder.data(message("holder"))[0] == 250
        thread.join(WAIT)
        assert result and result[0][0] == 250, result
        assert waiting.data(message("waiting"))[0] == 250
    assert proxy.accepted == 1


def test_refused_recipients_hold_no_connection(
    serve: Any, sink: Any, loop_thread: LoopThread
) -> None:
    proxy = CountingProxy(loop_thread, sink("-f", "RCPT").port)
    controller = serve(make_relay(proxy.next_hop, max_connections=1, connection_wait=0.2))
    with client_at(controller.port) as first, client_at(controller.port) as second:
        assert first.rcpt(f"nobody@{DOMAIN}")[0] == 500  # refused by the next hop; then idle
        # The second client's recipient is asked of the next hop too, not refused for want
        # of a connection.
        assert second.rcpt(f"nobody@{DOMAIN}")[0] == 500
        assert first.rcpt(f"again@{DOMAIN}")[0] == 500
    assert proxy.accepted == 1  # one connection, taken and given back each time


def test_no_connection_for_a_recipient_we_refuse(
    serve: Any, sink: Any, loop_thread: LoopThread
) -> None:
    proxy = CountingProxy(loop_thread, sink().port)
    controller = serve(make_relay(proxy.next_hop))
    with client_at(controller.port) as client:
        assert client.rcpt("r@elsewhere.test")[0] == 550  # relay denied
        assert client.rcpt(f'"r@x"@{DOMAIN}')[0] == 550  # a probe form
        client.command_encoding = "utf-8"  # (smtplib's, to send the next one undeclared)
        assert client.rcpt(f"jürgen@{DOMAIN}")[0] == 553  # SMTPUTF8 not declared
        assert client.rcpt("r@busi\u200dness.test")[0] == 501  # not a valid IDN
        client.rset()
    assert proxy.accepted == 0
