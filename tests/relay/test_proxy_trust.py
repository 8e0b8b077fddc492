"""A PROXY header without a usable source address (v1 ``UNKNOWN``, v2 ``LOCAL``, v2 with a UNIX
or UNSPEC family) never gives the session the balancer's own address (issue 12 item 15): the
relay does not trust it, the per-IP limits count it under one ``unknown`` key (not the
balancer's exempt address), and the ``Received:`` header says ``unknown``.

The balancer is this test process on 127.0.0.1, which is in the relay's ``trusted_networks``
and in the limiter's exempt networks, as a balancer on the farm's own network often is.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from farm.limits import LocalLimiter
from tests.support.client import SMTPClient
from tests.support.relay import DOMAIN, make_relay

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(command: int, family_protocol: int, addresses: bytes = b"") -> bytes:
    """A PROXY v2 header: ``command`` 0 LOCAL / 1 PROXY, the family/protocol byte."""
    return (
        V2_SIGNATURE
        + bytes([0x20 | command, family_protocol])
        + struct.pack("!H", len(addresses))
        + addresses
    )


UNIX_PATHS = b"/run/client.sock".ljust(108, b"\x00") + b"/run/farm.sock".ljust(108, b"\x00")

HEADERS = {
    "v1 UNKNOWN": b"PROXY UNKNOWN\r\n",
    "v1 UNKNOWN with addresses": b"PROXY UNKNOWN 198.51.100.7 192.0.2.25 40000 25\r\n",
    "v2 LOCAL": v2_header(0, 0x00),
    "v2 LOCAL with addresses": v2_header(
        0, 0x11, bytes([198, 51, 100, 7, 192, 0, 2, 25]) + struct.pack("!HH", 40000, 25)
    ),
    "v2 PROXY UNSPEC": v2_header(1, 0x00),
    "v2 PROXY UNIX": v2_header(1, 0x31, UNIX_PATHS),
}


@pytest.mark.parametrize("name", HEADERS)
def test_no_usable_source_is_not_the_trusted_balancer(serve: Any, sink: Any, name: str) -> None:
    next_hop = sink()
    relay = make_relay(next_hop.next_hop, trusted_networks=["127.0.0.0/8"])
    controller = serve(relay, proxy_protocol_timeout=5.0, proxy_trusted_networks=["127.0.0.1/32"])
    client = SMTPClient(controller.port, timeout=10)
    client.send(HEADERS[name])
    assert client.reply().startswith("220 ")
    assert client.command("EHLO client.test").startswith("250")
    assert client.command("MAIL FROM:<a@ext.test>").startswith("250")
    assert client.command("RCPT TO:<victim@elsewhere.test>").startswith("550 5.7.1")
    # Mail for our own domain still flows, with an honest trace header.
    assert client.command(f"RCPT TO:<r@{DOMAIN}>").startswith("250")
    assert client.command("DATA").startswith("354")
    assert client.command("Subject: via LOCAL\r\n\r\nhello\r\n.").startswith("250")
    assert client.command("QUIT").startswith("221")
    client.close()
    dump = next_hop.wait_for(b"Subject: via LOCAL")
    assert b"Received: from client.test ([unknown])" in dump
    assert b"victim@elsewhere.test" not in dump


@pytest.mark.parametrize("name", ["v1 UNKNOWN", "v2 LOCAL"])
def test_no_usable_source_is_not_the_exempt_balancer(make_controller: Any, name: str) -> None:
    class ProxyHandler:
        async def handle_PROXY(self, server: Any, session: Any, envelope: Any, data: Any) -> bool:
            return True

    # 127.0.0.1 (the balancer) is exempt; the sessions it relays from unknown sources are not.
    limiter = LocalLimiter(sessions_per_ip=1)
    controller = make_controller(
        ProxyHandler(),
        limiter=limiter,
        proxy_protocol_timeout=5.0,
        proxy_trusted_networks=["127.0.0.1/32"],
    )
    first = SMTPClient(controller.port, timeout=10)
    first.send(HEADERS[name])
    assert first.reply().startswith("220 ")
    second = SMTPClient(controller.port, timeout=10)
    second.send(HEADERS[name])
    assert "too many connections from unknown" in second.reply()
    third = SMTPClient(controller.port, timeout=10)  # a real source is counted on its own
    third.send(b"PROXY TCP4 198.51.100.7 192.0.2.25 40000 25\r\n")
    assert third.reply().startswith("220 ")
    for client in (first, second, third):
        client.close()
