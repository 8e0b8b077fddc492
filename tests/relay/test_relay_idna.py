"""Internationalised domains in the relay policy and routes (issue 12 item 4): compared in UTS #46
non-transitional form (IDNA 2008, as libidn2 and Postfix compute it), and forwarded exactly as
judged. Python's ``idna`` codec (IDNA 2003) maps ``ß`` to ``ss``: ``u@busineß.com`` was then
taken for ``business.com``'s, while a next hop saw ``xn--busine-gta.com``, someone else's.

The next hop is a scripted fake that offers SMTPUTF8 (Postfix's smtp-sink does not) and records
every line it receives.
"""

from __future__ import annotations

import smtplib
from typing import Any

import pytest

from farm.relay.routes import RouteTable, judged_address, normalise_domain, parse_route
from tests.support.relay import FakeNextHop, LoopThread, make_relay, smtp_dialogue
from tests.support.wait import WAIT

UTF8_EHLO = b"250-fake\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"


def utf8_next_hop(loop_thread: LoopThread) -> FakeNextHop:
    async def script(reader: Any, writer: Any, hop: FakeNextHop) -> None:
        await smtp_dialogue(reader, writer, hop, ehlo=UTF8_EHLO)

    return FakeNextHop(script, loop_thread).start()


def rcpt_lines(hop: FakeNextHop) -> list[str]:
    return [line.decode().rstrip() for line in hop.lines if line.upper().startswith(b"RCPT")]


def session(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=WAIT)
    client.ehlo("client.test")
    assert client.mail("a@ext.test", ["SMTPUTF8"])[0] == 250
    return client


def test_a_lookalike_of_our_domain_is_not_ours(serve: Any, loop_thread: LoopThread) -> None:
    hop = utf8_next_hop(loop_thread)
    controller = serve(make_relay(hop.next_hop, domains=["business.com"]))
    with session(controller.port) as client:
        assert client.rcpt("u@busineß.com") == (550, b"5.7.1 Relay access denied")
        assert client.rcpt("u@BUSINESS.com")[0] == 250
        assert client.data(b"Subject: idna\r\n\r\nhi\r\n")[0] == 250
    assert rcpt_lines(hop) == ["RCPT TO:<u@BUSINESS.com>"]


def test_an_idn_of_ours_is_forwarded_as_judged(serve: Any, loop_thread: LoopThread) -> None:
    hop = utf8_next_hop(loop_thread)
    controller = serve(make_relay(hop.next_hop, domains=["busineß.com", ".bücher.example"]))
    with session(controller.port) as client:
        assert client.rcpt("u@BUSINEß.com")[0] == 250
        assert client.rcpt("v@xn--busine-gta.com")[0] == 250
        assert client.rcpt("w@shop.BÜCHER\uff0eexample")[0] == 250  # fullwidth dot: UTS #46 maps it
        assert client.rcpt("x@business.com") == (550, b"5.7.1 Relay access denied")
        assert client.rcpt("y@busi\u200dneß.com") == (501, b"5.1.3 Bad recipient address syntax")
        assert client.data(b"Subject: idna\r\n\r\nhi\r\n")[0] == 250
    assert rcpt_lines(hop) == [
        "RCPT TO:<u@xn--busine-gta.com>",
        "RCPT TO:<v@xn--busine-gta.com>",
        "RCPT TO:<w@shop.xn--bcher-kva.example>",
    ]


def test_routes_compare_in_uts46_form() -> None:
    default, special = parse_route("127.0.0.1:1"), parse_route("lmtp:127.0.0.1:2")
    table = RouteTable(default, {"busineß.com": "lmtp:127.0.0.1:2", ".straße.de": "127.0.0.1:3"})
    assert table.for_address("u@xn--busine-gta.com") == special
    assert table.for_address("u@BUSINEß.com") == special
    assert table.for_address("u@business.com") == default
    assert table.for_address("u@a.strasse.de") == default
    assert table.for_address("u@a.STRAßE.de") == parse_route("127.0.0.1:3")
    assert table.for_address("u@busi\u200dneß.com") == default  # not a valid IDN


def test_normalised_forms() -> None:
    assert normalise_domain("Busineß.COM.") == "xn--busine-gta.com"
    assert normalise_domain("ς.gr") == "xn--3xa.gr"  # final sigma kept (IDNA 2003 maps it)
    assert normalise_domain(".München.de") == ".xn--mnchen-3ya.de"
    assert normalise_domain("Example.COM.") == "example.com"
    assert judged_address("u@\uff25\uff38AMPLE\u3002com") == "u@example.com"
    assert judged_address('"q@x"@Straße.de') == '"q@x"@xn--strae-oqa.de'
    assert judged_address("u@[192.0.2.1]") == "u@[192.0.2.1]"
    assert judged_address("postmaster") == "postmaster"
    for bad in ("a\u200db.com", "\u2028.com", "x.-bad-ß.com"):
        with pytest.raises(ValueError):
            normalise_domain(bad)


def test_an_invalid_idn_in_the_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="bad domain"):
        make_relay("127.0.0.1:1", domains=["a\u200db.com"])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"next_hop": 25}, "bad next hop 25"),
        ({"routes": {"a.example": 26}}, "bad next hop 26"),
        ({"domains": [5]}, "bad domain 5: not a string"),
        ({"tls": True}, "bad tls 'True'"),
    ],
)
def test_configuration_values_of_the_wrong_type_are_named(
    arguments: dict[str, object], message: str
) -> None:
    """A farm.toml value of the wrong type (say a number for a next hop) is refused with what
    is wrong, as a bad value is: the relay's compiled modules check types themselves."""
    settings: dict[str, object] = {"next_hop": "127.0.0.1:1", "domains": ["a.example"]}
    with pytest.raises(ValueError, match=message):
        make_relay(**{**settings, **arguments})
