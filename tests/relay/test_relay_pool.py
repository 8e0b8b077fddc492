"""Connection reuse: the relay's pool per next hop, counted at a TCP proxy in front of
``smtp-sink`` (or at a scripted fake next hop), and no connection left behind."""

from __future__ import annotations

import smtplib
import uuid
from typing import Any

import pytest

from tests.support.client import SMTPClient
from tests.support.relay import (
    DOMAIN,
    HAVE_SINK,
    CountingProxy,
    FakeNextHop,
    LoopThread,
    attempt,
    close_relay,
    connections_to,
    message,
    pool_idle,
    smtp_dialogue,
)
from tests.support.relay import make_relay as relay
from tests.support.wait import WAIT, wait_for

pytestmark = pytest.mark.skipif(not HAVE_SINK, reason="smtp-sink not installed")


def test_one_session_many_messages_one_connection(
    serve: Any, sink: Any, loop_thread: LoopThread
) -> None:
    next_hop = sink()
    proxy = CountingProxy(loop_thread, next_hop.port)
    controller = serve(relay(proxy.next_hop))
    marker = f"pool-{uuid.uuid4().hex}"
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("client.test")
        for i in range(30):
            assert client.sendmail("a@ext.test", [f"r{i}@{DOMAIN}"], message(marker)) == {}
    next_hop.wait_for(f"Subject: {marker}".encode(), 30)
    assert next_hop.count(f"Subject: {marker}".encode()) == 30
    assert proxy.accepted == 1


def test_reuse_across_sessions_and_after_rset(
    serve: Any, sink: Any, loop_thread: LoopThread
) -> None:
    """Sessions one after another share the connection; a client RSET, a QUIT or a disconnect
    in mid-transaction gives it back after an upstream RSET."""
    next_hop = sink()
    proxy = CountingProxy(loop_thread, next_hop.port)
    handler = relay(proxy.next_hop)
    controller = serve(handler)
    marker = f"reuse-{uuid.uuid4().hex}"
    for _ in range(5):
        assert attempt(controller.port, [f"r@{DOMAIN}"], message(marker)).accepted
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("client.test")
        client.mail("a@ext.test")
        assert client.rcpt(f"r@{DOMAIN}")[0] == 250
        assert client.rset()[0] == 250
        assert attempt(0, [f"r@{DOMAIN}"], message(marker), client=client).accepted
        client.mail("a@ext.test")
        assert client.rcpt(f"r@{DOMAIN}")[0] == 250
    # QUIT in mid-transaction (smtplib's context exit)
    wait_for(lambda: pool_idle(handler) == 1, "the connection back in the pool")
    with SMTPClient(controller.port) as raw:
        assert raw.reply().startswith("220")
        for command in ("HELO raw.test", "MAIL FROM:<a@ext.test>", "RCPT TO:<r@farm.test>"):
            assert raw.command(command).startswith("250")
    # disconnect in mid-transaction: handle_CLOSE gives the connection back
    wait_for(lambda: pool_idle(handler) == 1, "the connection back in the pool")
    assert attempt(controller.port, [f"r@{DOMAIN}"], message(marker)).accepted
    next_hop.wait_for(f"Subject: {marker}".encode(), 7)
    assert next_hop.count(f"Subject: {marker}".encode()) == 7  # only the completed ones
    assert proxy.accepted == 1
    assert next_hop.text().count(b"X-Rcpt-Args:") == 7  # abandoned recipients never arrive


def test_pool_max_messages_and_size(serve: Any, sink: Any, loop_thread: LoopThread) -> None:
    next_hop = sink()
    proxy = CountingProxy(loop_thread, next_hop.port)
    controller = serve(relay(proxy.next_hop, pool_max_messages=4))
    marker = f"max-{uuid.uuid4().hex}"
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("client.test")
        for _ in range(12):
            assert client.sendmail("a@ext.test", [f"r@{DOMAIN}"], message(marker)) == {}
    next_hop.wait_for(f"Subject: {marker}".encode(), 12)
    assert proxy.accepted == 3
    wait_for(lambda: proxy.closed >= 3, "retired connections closed")


def test_no_pooling_with_size_zero(serve: Any, sink: Any, loop_thread: LoopThread) -> None:
    next_hop = sink()
    proxy = CountingProxy(loop_thread, next_hop.port)
    controller = serve(relay(proxy.next_hop, pool_size=0))
    for _ in range(3):
        assert attempt(controller.port, [f"r@{DOMAIN}"], message("nopool")).accepted
    assert proxy.accepted == 3
    wait_for(lambda: proxy.closed == 3, "every connection closed")


def test_idle_connections_close_on_timeout(serve: Any, sink: Any, loop_thread: LoopThread) -> None:
    next_hop = sink()
    proxy = CountingProxy(loop_thread, next_hop.port)
    handler = relay(proxy.next_hop, pool_idle_timeout=0.5)
    controller = serve(handler)
    assert attempt(controller.port, [f"r@{DOMAIN}"], message("idle")).accepted
    wait_for(lambda: proxy.accepted == 1 and proxy.closed == 1, "the idle connection closed")
    wait_for(lambda: connections_to(proxy.port) == 0, "no fd left to the next hop")
    assert pool_idle(handler) == 0
    assert attempt(controller.port, [f"r@{DOMAIN}"], message("idle")).accepted
    assert proxy.accepted == 2


def test_aclose_leaves_no_connections(serve: Any, sink: Any, loop_thread: LoopThread) -> None:
    next_hop = sink()
    proxy = CountingProxy(loop_thread, next_hop.port)
    handler = relay(proxy.next_hop)
    controller = serve(handler)
    clients = [smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) for _ in range(3)]
    try:
        for client in clients:  # three transactions open at once: three connections
            client.ehlo("client.test")
            client.mail("a@ext.test")
            assert client.rcpt(f"r@{DOMAIN}")[0] == 250
        for client in clients:
            assert client.data(message("closing"))[0] == 250
    finally:
        for client in clients:
            client.close()
    assert proxy.accepted == 3
    wait_for(lambda: pool_idle(handler) == 3, "three idle connections")
    assert connections_to(proxy.port) == 3
    close_relay(handler, controller)
    assert connections_to(proxy.port) == 0
    wait_for(lambda: proxy.closed == 3, "the proxy saw every connection close")
    # The handler is still usable afterwards.
    assert attempt(controller.port, [f"r@{DOMAIN}"], message("after")).accepted


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize("death", ["421", "eof"])
def test_dead_pooled_connection_retried_transparently(
    serve: Any, loop_thread: LoopThread, death: str, pipelining: bool
) -> None:
    """A next hop that drops a reused connection at its second ``MAIL`` (421 or plain close):
    the relay retries once on a new connection and the client never notices. ``pipelined``:
    the next hop answers MAIL only with the RCPT sent in the same write (the 421 is followed
    by the RCPT's reply, which is never read)."""

    def answer(line: bytes, transaction: int) -> bytes | None:
        if line.upper().startswith(b"MAIL") and transaction == 2:
            return b"" if death == "eof" else b"421 4.3.2 shutting down\r\n"
        return None

    async def script(reader: Any, writer: Any, hop: FakeNextHop) -> None:
        await smtp_dialogue(reader, writer, hop, answer, pipelining=pipelining)

    hop = FakeNextHop(script, loop_thread).start()
    handler = relay(hop.next_hop, timeout=3.0)
    controller = serve(handler)
    for i in range(3):
        result = attempt(controller.port, [f"r{i}@{DOMAIN}"], message(f"m{i}"))
        assert result.rcpt == [(250, b"2.1.5 OK")] and result.accepted, result
    assert len(hop.messages) == 3
    assert hop.connections == 3  # each connection dies at its second MAIL


def test_next_hop_restart_between_messages(serve: Any, sink: Any, loop_thread: LoopThread) -> None:
    """The next hop is killed and started again (same port) between two messages: the pooled
    connection is dead; the second message still goes through, exactly once."""
    first = sink()
    handler = relay(first.next_hop)
    controller = serve(handler)
    assert attempt(controller.port, [f"r@{DOMAIN}"], message("before")).accepted
    first.wait_for(b"Subject: before")
    assert pool_idle(handler) == 1
    first.stop()
    second = sink(port=first.port)
    assert attempt(controller.port, [f"r@{DOMAIN}"], message("after")).accepted
    assert second.wait_for(b"Subject: after").count(b"Subject: after") == 1
    assert b"Subject: after" not in first.text()


def test_hook_timeout_drops_the_upstream_transaction(
    serve: Any, sink: Any, loop_thread: LoopThread
) -> None:
    """The next hop hangs at RCPT past the engine's hook timeout: the client is cut off and the
    next hop's connection (state unknown) is closed, not pooled."""
    next_hop = sink("-W", "RCPT:30")
    proxy = CountingProxy(loop_thread, next_hop.port)
    handler = relay(proxy.next_hop, timeout=30.0)
    controller = serve(handler, timeout=3.0)
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("client.test")
        client.mail("a@ext.test")
        code, _ = client.rcpt(f"r@{DOMAIN}")
        assert code in (421, 451)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    wait_for(lambda: proxy.accepted == 1 and proxy.closed == 1, "upstream connection closed")
    assert pool_idle(handler) == 0


def test_controller_stop_closes_the_pool(
    make_controller: Any, sink: Any, loop_thread: LoopThread
) -> None:
    next_hop = sink()
    proxy = CountingProxy(loop_thread, next_hop.port)
    handler = relay(proxy.next_hop)
    controller = make_controller(handler)
    assert attempt(controller.port, [f"r@{DOMAIN}"], message("pooled")).accepted
    wait_for(lambda: pool_idle(handler) == 1, "one idle pooled connection")
    controller.stop()  # Controller._shutdown calls the handler's aclose()
    wait_for(lambda: proxy.closed == 1, "the pooled connection closed by stop()")
    assert connections_to(proxy.port) == 0
