"""The PROXY protocol (HAProxy v1 and v2) in front of real SMTP sessions.

Headers are sent whole, one byte per write, and in one segment with the first command; from a
trusted and an untrusted address; malformed, late and refused headers close the connection
without a greeting and without a traceback. On a listener without PROXY enabled the header is
just an unknown command. Raw sockets with a 10 s timeout; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from farm.proxy_protocol import AF, PROTO, V2_CMD
from tests.support.client import SMTPClient
from tests.support.logcheck import logged_errors
from tests.support.loops import both_loops  # noqa: F401  (loop_kind: asyncio and uvloop)

TIMEOUT = 10.0
HOST = "farm.test"
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"

V1_TCP4 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 587\r\n"


def v2_tcp4(
    src: str = "203.0.113.7",
    dst: str = "198.51.100.2",
    sport: int = 40001,
    dport: int = 25,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 PROXY/TCP-over-IPv4 header, built by hand from the spec's layout."""
    block = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    block += tlvs
    return V2_SIG + bytes([0x21, 0x11]) + struct.pack("!H", len(block)) + block


def v2_tcp6(src: str = "2001:db8::7", dst: str = "2001:db8::2") -> bytes:
    block = (
        socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + struct.pack("!HH", 5555, 465)
    )
    return V2_SIG + bytes([0x21, 0x21]) + struct.pack("!H", len(block)) + block


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


@pytest.fixture(autouse=True)
def no_tracebacks(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """No ERROR record and no traceback, in any test (a bad header is the client's fault)."""
    yield
    if request.node.get_closest_marker("xfail") is not None:
        return
    bad = logged_errors(caplog, (HandlerBoom,))
    assert not bad, bad


# -- handlers and a raw client --------------------------------------------------------------


class ProxyHandler:
    """Records every ``handle_PROXY`` call and delivery; ``accept`` is what the hook returns."""

    def __init__(self, accept: Any = True) -> None:
        self.accept = accept
        self.proxy_calls: list[tuple[Any, Any]] = []  # (session, proxy_data)
        self.envelopes: list[Any] = []
        self.sessions: list[Any] = []
        self.lock = threading.Lock()

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: Any) -> Any:
        with self.lock:
            self.proxy_calls.append((session, proxy_data))
        return self.accept

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        self.sessions.append(session)
        return "250 OK"


class HandlerBoom(Exception):
    """Raised on purpose by a test handler: the only traceback a log may carry."""


class RaisingProxyHook(ProxyHandler):
    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: Any) -> Any:
        await super().handle_PROXY(server, session, envelope, proxy_data)
        raise HandlerBoom("handle_PROXY failed on purpose")


class NoProxyHook:
    """A handler without ``handle_PROXY``."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


def proxy_controller(make_controller: Any, handler: Any, **kwargs: Any) -> Any:
    """A started Controller whose connections expect a PROXY header (``proxy_protocol_timeout``)."""
    kwargs.setdefault("proxy_protocol_timeout", 5)
    return make_controller(handler, **kwargs)


def smtp_transaction(wire: SMTPClient) -> None:
    assert wire.cmd("MAIL FROM:<a@example.com>") == "250 OK"
    assert wire.cmd("RCPT TO:<b@example.com>") == "250 OK"
    assert wire.cmd("DATA").startswith("354 ")
    assert wire.cmd("hello\r\n.") == "250 OK"
    assert wire.cmd("QUIT") == "221 Bye"


# -- headers that are accepted --------------------------------------------------------------

HEADERS = {
    "v1-tcp4": (V1_TCP4, IPv4Address("192.0.2.1"), 56324, IPv4Address("198.51.100.2"), 25),
    "v1-tcp6": (V1_TCP6, IPv6Address("2001:db8::1"), 1234, IPv6Address("2001:db8::2"), 587),
    "v2-tcp4": (v2_tcp4(), IPv4Address("203.0.113.7"), 40001, IPv4Address("198.51.100.2"), 25),
    "v2-tcp6": (v2_tcp6(), IPv6Address("2001:db8::7"), 5555, IPv6Address("2001:db8::2"), 465),
}


@pytest.mark.parametrize("how", ["whole", "bytewise", "with-ehlo"])
@pytest.mark.parametrize("kind", list(HEADERS))
def test_accepted_header_then_smtp(make_controller: Any, kind: str, how: str) -> None:
    header, src, sport, dst, dport = HEADERS[kind]
    handler = ProxyHandler()
    controller = proxy_controller(make_controller, handler)
    with SMTPClient.of(controller, timeout=TIMEOUT) as wire:
        if how == "with-ehlo":
            wire.send(header + b"EHLO client.example\r\n")  # one segment
        else:
            wire.send(header, bytewise=how == "bytewise")
        greeting = wire.line()
        assert greeting.startswith(f"220 {HOST} "), greeting
        if how != "with-ehlo":
            wire.send(b"EHLO client.example\r\n")
        assert wire.reply().lines[0] == f"250-{HOST}"
        smtp_transaction(wire)
        assert wire.read_to_close() == b""
    assert len(handler.proxy_calls) == 1
    session, proxy_data = handler.proxy_calls[0]
    assert handler.sessions == [session]
    assert session.proxy_data is proxy_data
    assert proxy_data.version == (1 if kind.startswith("v1") else 2)
    assert proxy_data.protocol == PROTO.STREAM
    assert proxy_data.family == (AF.INET if "tcp4" in kind else AF.INET6)
    assert (proxy_data.src_addr, proxy_data.src_port) == (src, sport)
    assert (proxy_data.dst_addr, proxy_data.dst_port) == (dst, dport)
    assert proxy_data.trailing in (b"", b"EHLO client.example\r\n")
    assert session.peer[0] == "127.0.0.1"  # the real peer stays the peer
    assert handler.envelopes[0].content == b"hello\r\n"


def test_v2_header_with_tlvs(make_controller: Any) -> None:
    handler = ProxyHandler()
    controller = proxy_controller(make_controller, handler)
    header = v2_tcp4(tlvs=tlv(0x02, b"mx.example.org") + tlv(0x05, b"id-42"))
    with SMTPClient.of(controller, timeout=TIMEOUT) as wire:
        wire.send(header, bytewise=True)
        assert wire.line().startswith("220 ")
        assert wire.cmd("QUIT") == "221 Bye"
    _, proxy_data = handler.proxy_calls[0]
    assert proxy_data.command == V2_CMD.PROXY
    assert proxy_data.tlv["AUTHORITY"] == b"mx.example.org"
    assert proxy_data.tlv.UNIQUE_ID == b"id-42"


@pytest.mark.parametrize(
    "networks", [["127.0.0.0/8"], ["10.0.0.0/8", "127.0.0.1/32"], ["::1", "127.0.0.0/8"]]
)
def test_trusted_network_works(make_controller: Any, networks: list[str]) -> None:
    handler = ProxyHandler()
    controller = proxy_controller(make_controller, handler, proxy_trusted_networks=networks)
    with SMTPClient.of(controller, timeout=TIMEOUT) as wire:
        wire.send(V1_TCP4)
        assert wire.line().startswith(f"220 {HOST} ")
        assert wire.cmd("HELO client.example") == f"250 {HOST}"
        smtp_transaction(wire)
    assert handler.proxy_calls[0][1].src_addr == IPv4Address("192.0.2.1")


# -- headers that close the connection ------------------------------------------------------


@pytest.mark.parametrize("accept", [False, None, 0, ""])
def test_handle_proxy_falsy_closes_without_greeting(make_controller: Any, accept: Any) -> None:
    handler = ProxyHandler(accept=accept)
    controller = proxy_controller(make_controller, handler)
    with SMTPClient.of(controller, timeout=TIMEOUT) as wire:
        wire.send(V1_TCP4)
        assert wire.read_to_close() == b""
    assert len(handler.proxy_calls) == 1
    assert handler.envelopes == []


def test_handle_proxy_falsy_with_pipelined_commands_closes(make_controller: Any) -> None:
    handler = ProxyHandler(accept=False)
    controller = proxy_controller(make_controller, handler)
    with SMTPClient.of(controller, timeout=TIMEOUT) as wire:
        wire.send(
            v2_tcp4() + b"HELO x\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
            b"DATA\r\nsmuggled\r\n.\r\nQUIT\r\n"
        )
        assert wire.read_to_close() == b""
    assert len(handler.proxy_calls) == 1
    assert handler.envelopes == []


def test_handle_proxy_raising_closes_without_greeting(make_controller: Any) -> None:
    handler = RaisingProxyHook()
    controller = proxy_controller(make_controller, handler)
    with SMTPClient.of(controller, timeout=TIMEOUT) as wire:
        wire.send(V1_TCP4 + b"HELO x\r\n")
        assert wire.read_to_close() == b""
    assert len(handler.proxy_calls) == 1


def test_handler_without_handle_proxy_closes(make_controller: Any) -> None:
    handler = NoProxyHook()
    controller = proxy_controller(make_controller, handler)
    with SMTPClient.of(controller, timeout=TIMEOUT) as wire:
        wire.send(V1_TCP4 + b"HELO x\r\n")
        assert wire.read_to_close() == b""
    assert handler.envelopes == []


MALFORMED = {
    "v1-bad-address": b"PROXY TCP4 999.0.2.1 198.51.100.2 56324 25\r\n",
    "v1-bad-port": b"PROXY TCP4 192.0.2.1 198.51.100.2 99999 25\r\n",
    "v1-bad-protocol": b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n",
    "v1-family-mismatch": b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
    "v1-missing-fields": b"PROXY TCP4 192.0.2.1\r\n",
    "v1-bare-lf": b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\n",
    "v1-too-long": b"PROXY TCP4 " + b"1" * 120 + b"\r\n",
    "no-header-smtp": b"EHLO client.example\r\n",
    "no-header-tls": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "v2-bad-version": V2_SIG + b"\x31\x11\x00\x0c" + b"\x00" * 12,
    "v2-bad-command": V2_SIG + b"\x2f\x11\x00\x0c" + b"\x00" * 12,
    "v2-short-address-block": V2_SIG + b"\x21\x11\x00\x04" + b"\x01\x02\x03\x04",
    "v2-truncated-tlv": v2_tcp4(tlvs=b"\x02\x00\x10abc"),
    "v2-bad-crc": v2_tcp4(tlvs=tlv(0x03, b"\x00\x00\x00\x01")),
}


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_header_closes_without_traceback(
    make_controller: Any, caplog: pytest.LogCaptureFixture, kind: str, bytewise: bool
) -> None:
    caplog.set_level(logging.INFO, logger="farm.smtp")
    handler = ProxyHandler()
    controller = proxy_controller(make_controller, handler)
    with SMTPClient.of(controller, timeout=TIMEOUT) as wire:
        # (the server may close as soon as the header goes wrong, before all of it is sent)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            wire.send(MALFORMED[kind], bytewise=bytewise)
        assert wire.read_to_close() == b""
    assert handler.proxy_calls == []
    assert any("PROXY" in r.getMessage() for r in caplog.records if r.name == "farm.smtp")
    # (the autouse fixture asserts: no ERROR record, no traceback)


def test_no_header_in_time_closes(make_controller: Any) -> None:
    handler = ProxyHandler()
    controller = proxy_controller(make_controller, handler, proxy_protocol_timeout=1)
    with (
        SMTPClient.of(controller, timeout=TIMEOUT) as silent,
        SMTPClient.of(controller, timeout=TIMEOUT) as partial,
    ):
        partial.send(V1_TCP4[:20])
        started = time.monotonic()
        assert silent.read_to_close() == b""
        assert partial.read_to_close() == b""
        assert time.monotonic() - started >= 0.5  # it was the timeout that closed them
    assert handler.proxy_calls == []


def test_untrusted_peer_closed_before_reading(make_controller: Any) -> None:
    handler = ProxyHandler()
    # A 30 s header timeout: a close within the socket's 10 s can only be the refusal.
    controller = proxy_controller(
        make_controller,
        handler,
        proxy_protocol_timeout=30,
        proxy_trusted_networks=["10.0.0.0/8", "::1/128"],
    )
    with SMTPClient.of(controller, timeout=TIMEOUT) as silent:
        assert silent.read_to_close() == b""  # closed without waiting for a header
    with SMTPClient.of(controller, timeout=TIMEOUT) as eager:
        # A valid header and a whole transaction, sent at once: none of it may be read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            eager.send(V1_TCP4 + b"HELO x\r\nMAIL FROM:<a@example.com>\r\nQUIT\r\n")
        assert eager.read_to_close() == b""
    assert handler.proxy_calls == []
    assert handler.envelopes == []


# -- a listener without PROXY ----------------------------------------------------------------


def test_proxy_line_on_a_plain_listener_is_an_unknown_command(make_controller: Any) -> None:
    handler = ProxyHandler()
    controller = make_controller(handler)
    with SMTPClient.of(controller, timeout=TIMEOUT) as wire:
        assert wire.line().startswith(f"220 {HOST} ")
        wire.send(V1_TCP4)
        assert wire.line() == '500 Error: command "PROXY" not recognized'
        wire.send(b"EHLO client.example\r\n")
        assert wire.reply().lines[0] == f"250-{HOST}"
        smtp_transaction(wire)
    assert handler.proxy_calls == []
    assert handler.sessions[0].proxy_data is None


# -- known problems --------------------------------------------------------------------------


@pytest.mark.parametrize("loop_kind", ["asyncio"])
def test_controller_with_proxy_starts_promptly(make_controller: Any, loop_kind: str) -> None:
    started = time.monotonic()
    make_controller(ProxyHandler(), proxy_protocol_timeout=2)
    assert time.monotonic() - started < 1.5


class HungProxyHook:
    """``handle_PROXY`` never returns."""

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: Any) -> Any:
        await asyncio.Event().wait()


@pytest.mark.parametrize("loop_kind", ["asyncio"])
def test_hung_handle_proxy_is_given_up(make_controller: Any, loop_kind: str) -> None:
    controller = proxy_controller(
        make_controller, HungProxyHook(), proxy_protocol_timeout=1, timeout=1
    )
    controller.drain_timeout = 1
    with SMTPClient.of(controller, timeout=TIMEOUT) as wire:
        wire.sock.settimeout(4)  # 4 x the timeouts
        wire.send(V1_TCP4)
        try:
            data = wire.read_to_close()
        except TimeoutError:
            pytest.fail("the connection was still open after 4 s")
        assert not data.startswith(b"220")
