"""``farm.relay.Relay`` against Postfix's ``smtp-sink`` as the next hop.

Each test starts its own ``smtp-sink`` on a free loopback port (stopped by pid at teardown),
with every transaction dumped to a file, so delivery is checked byte for byte and counted.
Senders: smtplib, swaks and smtp-source. The rule under test: every message the sender saw
``250`` for arrives exactly once; a message the next hop did not take never gets a ``250``.
"""

from __future__ import annotations

import email.policy
import ipaddress
import logging
import smtplib
import subprocess
import time
import uuid
from email.parser import BytesHeaderParser
from types import SimpleNamespace
from typing import Any

import pytest

from farm.controller import Controller
from farm.lmtp import LMTP
from farm.relay import RELAY_DENIED, clean_content, dot_stuff
from farm.smtp import SMTP
from tests.support.client import SMTPClient
from tests.support.net import free_port, taken_port
from tests.support.relay import (
    DOMAIN,
    HAVE_SINK,
    SMTP_SOURCE,
    SWAKS,
    FakeNextHop,
    LoopThread,
    attempt,
    close_relay,
    message,
    send,
    smtp_dialogue,
)
from tests.support.relay import make_relay as relay
from tests.support.wait import WAIT

pytestmark = pytest.mark.skipif(not HAVE_SINK, reason="smtp-sink not installed")


def data_reply(port: int, rcpts: list[str], data: bytes) -> tuple[int, bytes]:
    """The reply to the end of data (or to DATA), via smtplib's low-level commands."""
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        client.ehlo("client.test")
        assert client.mail("a@ext.test")[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        return client.data(data)


# -- normal delivery ---------------------------------------------------------------------------


def test_delivery_arrives_once_with_received_header(serve: Any, sink: Any) -> None:
    next_hop = sink()
    controller = serve(relay(next_hop.next_hop))
    marker = f"relay-{uuid.uuid4().hex}"
    refused = send(controller.port, [f"r@{DOMAIN}"], message(marker, "body line one"))
    assert refused == {}
    dump = next_hop.wait_for(marker.encode() + b"\n")
    assert dump.count(f"Subject: {marker}".encode()) == 1
    assert b"body line one" in dump
    ours = [line for line in dump.split(b"\n") if b"(farm)" in line]
    assert len(ours) == 1
    assert b"by farm.test (farm) with ESMTP" in ours[0]
    text = dump.decode()
    received = text[text.index("Received: from", text.index("X-Rcpt-Args")) :]
    received = received[received.index("Received: from", 1) :]  # skip smtp-sink's own
    assert received.startswith("Received: from ")
    assert "([127.0.0.1])" in received.split("\n")[0]
    assert f"for <r@{DOMAIN}>;" in received
    assert "X-Rcpt-Args: <r@farm.test>" in text
    # Our header comes right before the sender's, which arrive unchanged.
    assert received.index("From: a@ext.test") < received.index(marker)


def test_swaks_delivery_and_subdomain(serve: Any, sink: Any) -> None:
    if SWAKS is None:
        pytest.skip("swaks not installed")
    next_hop = sink()
    controller = serve(relay(next_hop.next_hop))
    marker = f"swaks-{uuid.uuid4().hex}"
    result = subprocess.run(
        [
            SWAKS,
            "--server",
            f"127.0.0.1:{controller.port}",
            "--helo",
            "swaks.client.test",
            "--from",
            "a@ext.test",
            "--to",
            "R@Deep.Sub.FARM.test,s@farm.test",
            "--header",
            f"Subject: {marker}",
            "--body",
            "swaks body",
            "--timeout",
            "10",
        ],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    dump = next_hop.wait_for(marker.encode())
    assert dump.count(f"Subject: {marker}".encode()) == 1
    assert b"Received: from swaks.client.test ([127.0.0.1])" in dump
    assert b"X-Rcpt-Args: <R@Deep.Sub.FARM.test>" in dump
    assert b"X-Rcpt-Args: <s@farm.test>" in dump


def test_lmtp_next_hop(serve: Any, sink: Any) -> None:
    next_hop = sink("-L")
    controller = serve(relay(next_hop.next_hop, lmtp=True))
    marker = f"lmtp-{uuid.uuid4().hex}"
    assert send(controller.port, [f"r@{DOMAIN}", f"s@{DOMAIN}"], message(marker)) == {}
    dump = next_hop.wait_for(marker.encode())
    assert b"X-Client-Proto: LMTP" in dump
    assert dump.count(f"Subject: {marker}".encode()) == 1


def test_lmtp_front_end_gets_one_reply_per_recipient(sink: Any) -> None:
    next_hop = sink()

    class LMTPController(Controller):
        def factory(self) -> SMTP:
            return LMTP(self.handler, **self.SMTP_kwargs)

    handler = relay(next_hop.next_hop)
    controller = LMTPController(handler, hostname="127.0.0.1", port=0, server_hostname="farm.test")
    controller.start()
    try:
        # smtplib.LMTP reads only one reply after the data, so the dialogue is done by hand.
        with SMTPClient(controller.port) as raw:
            assert raw.reply().startswith("220")
            assert raw.command("LHLO client.test").code == 250
            assert raw.command("MAIL FROM:<a@ext.test>").startswith("250")
            for rcpt in (f"r@{DOMAIN}", "r@ext.test", f"s@{DOMAIN}"):
                assert raw.command(f"RCPT TO:<{rcpt}>").code == (550 if "ext" in rcpt else 250)
            assert raw.command("DATA").startswith("354")
            raw.send(message("x") + b".\r\n")
            replies = [raw.reply(), raw.reply()]
            assert raw.command("QUIT").startswith("221")
        assert all(reply.startswith("250 ") for reply in replies), replies
    finally:
        close_relay(handler, controller)
        controller.stop()
    next_hop.wait_for(b"Subject: x")


# -- policy ------------------------------------------------------------------------------------

SENDERS = ["<>", "<a@ext.test>", f"<a@{DOMAIN}>", "<a@[127.0.0.1]>"]
#: nmap's smtp-open-relay recipients, with ext.test as the foreign domain, plus the
#: relay-domain confusions of security notes 6.1 items 30-31.
PROBES = [
    "<r@ext.test>",
    "<r%ext.test@[127.0.0.1]>",
    f"<r%ext.test@{DOMAIN}>",
    '<"r@ext.test">',
    '<"r%ext.test">',
    "<r@ext.test@[127.0.0.1]>",
    '<"r@ext.test"@[127.0.0.1]>',
    f"<r@ext.test@{DOMAIN}>",
    "<@[127.0.0.1]:r@ext.test>",
    f"<@{DOMAIN}:r@ext.test>",
    "<ext.test!r>",
    "<ext.test!r@[127.0.0.1]>",
    f"<ext.test!r@{DOMAIN}>",
    '<"ext.test!r"@farm.test>',
    '<"r%ext.test"@farm.test>',
    "<r@EXT.test>",
    "<r@ext.test.>",
    "<r@farm.test.ext.test>",
    "<r@xfarm.test>",
    "<r@sub.farm.test>",  # only *under* .sub.farm.test is ours
    "<r@[IPv6:::1]>",
    "<r@[IPv6:::ffff:127.0.0.1]>",
    "<r@[10.1.2.3]>",
]


def test_open_relay_probes_from_untrusted_client_get_no_2xx(serve: Any, sink: Any) -> None:
    next_hop = sink()
    controller = serve(relay(next_hop.next_hop))
    accepted = []
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("probe.test")
        for sender in SENDERS:
            for probe in PROBES:
                client.rset()
                client.putcmd("MAIL", f"FROM:{sender}")
                assert client.getreply()[0] == 250
                client.putcmd("RCPT", f"TO:{probe}")
                code, text = client.getreply()
                if 200 <= code <= 299:
                    accepted.append((sender, probe))
                else:
                    assert code in (550, 553, 501), (probe, code, text)
        client.rset()
        client.mail("a@ext.test")
        assert client.rcpt("r@ext.test") == (550, RELAY_DENIED[4:].encode())
        assert client.docmd("DATA")[0] == 503
    assert accepted == []
    assert next_hop.text() == b""


def test_policy_decisions() -> None:
    handler = relay("127.0.0.1:1", domains=["Farm.Test.", ".sub.farm.test", "[192.0.2.7]"])
    untrusted = SimpleNamespace(peer=("127.0.0.1", 1), proxy_data=None, authenticated=False)
    for ours in ("r@farm.test", "r@FARM.TEST.", "r@a.sub.farm.test", "r@[192.0.2.7]", "postmaster"):
        assert handler.check_recipient(untrusted, ours) is None, ours
    # A literal only after normalising (a blank before it, a dot after): still ours.
    assert handler.check_recipient(untrusted, "r@ [192.0.2.7].") is None
    assert handler.check_recipient(untrusted, "r@ [192.0.2.8].") == "foreign domain"
    refusals = {
        "r@ext.test": "foreign domain",
        "r@sub.farm.test": "foreign domain",
        "r@[192.0.2.8]": "foreign IP literal",
        "nobody": "no domain",
    }
    for foreign, why in refusals.items():
        assert handler.check_recipient(untrusted, foreign) == why, foreign
    trusted = SimpleNamespace(peer=("10.9.8.7", 1), proxy_data=None, authenticated=False)
    assert handler.check_recipient(trusted, "r@ext.test") is None
    authenticated = SimpleNamespace(peer=("127.0.0.1", 1), proxy_data=None, authenticated=True)
    assert handler.check_recipient(authenticated, "r@ext.test") is None
    mapped = SimpleNamespace(peer=("::ffff:10.0.0.1", 1, 0, 0), proxy_data=None)
    assert handler.is_trusted(mapped)
    # A valid PROXY source replaces the peer, both ways.
    proxied = SimpleNamespace(
        peer=("10.0.0.1", 1),
        proxy_data=SimpleNamespace(valid=True, src_addr=ipaddress.ip_address("198.51.100.1")),
    )
    assert not handler.is_trusted(proxied)
    proxied.proxy_data.valid = False  # no usable source: not the (trusted) peer either
    assert not handler.is_trusted(proxied)
    # The probe forms are refused even for trusted and authenticated clients.
    for session in (trusted, authenticated):
        for probe in (
            "r%ext.test@farm.test",
            "ext.test!r",
            '"r@ext.test"@farm.test',
            "r@[10.0.0.1]",
        ):
            assert handler.check_recipient(session, probe) is not None, probe


def test_trusted_network_may_relay(serve: Any, sink: Any) -> None:
    next_hop = sink()
    controller = serve(relay(next_hop.next_hop, trusted_networks=["127.0.0.0/8"]))
    marker = f"trusted-{uuid.uuid4().hex}"
    assert send(controller.port, ["r@ext.test"], message(marker)) == {}
    dump = next_hop.wait_for(marker.encode())
    assert b"X-Rcpt-Args: <r@ext.test>" in dump
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("client.test")
        client.mail("a@ext.test")
        assert client.rcpt(f"r%ext.test@{DOMAIN}")[0] == 550


# -- next hop failures: the sender never gets a 250 for what the next hop did not take ---------


@pytest.mark.parametrize("command", ["MAIL", "RCPT", "DATA", "."])
def test_next_hop_rejects(serve: Any, sink: Any, command: str) -> None:
    next_hop = sink("-f", command)
    controller = serve(relay(next_hop.next_hop))
    result = attempt(controller.port, [f"r@{DOMAIN}"], message("rejected"))
    if command in ("MAIL", "RCPT"):  # refused live, at the client's RCPT
        assert result.final is None and 500 <= result.rcpt[0][0] <= 599, result
    else:
        assert result.rcpt[0][0] == 250
        assert result.final is not None and 500 <= result.final[0] <= 599, result
    assert b"Subject: rejected" not in next_hop.text() or command == "."


@pytest.mark.parametrize("command", ["MAIL", "RCPT", "DATA", "."])
def test_next_hop_temp_fails(serve: Any, sink: Any, command: str) -> None:
    next_hop = sink("-r", command)
    controller = serve(relay(next_hop.next_hop))
    result = attempt(controller.port, [f"r@{DOMAIN}"], message("deferred"))
    if command in ("MAIL", "RCPT"):
        assert result.final is None and 400 <= result.rcpt[0][0] <= 499, result
    else:
        assert result.final is not None and 400 <= result.final[0] <= 499, result


@pytest.mark.parametrize("command", ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "."])
def test_next_hop_drops_with_421(serve: Any, sink: Any, command: str) -> None:
    next_hop = sink("-Q", command)
    controller = serve(relay(next_hop.next_hop))
    result = attempt(controller.port, [f"r@{DOMAIN}"], message("dropped"))
    if command in ("DATA", "."):
        assert result.final is not None and result.final[0] == 451, result
    else:
        assert result.final is None and result.rcpt[0][0] == 451, result


def test_swaks_sees_no_250_when_next_hop_defers(serve: Any, sink: Any) -> None:
    if SWAKS is None:
        pytest.skip("swaks not installed")
    next_hop = sink("-r", ".")
    controller = serve(relay(next_hop.next_hop))
    server = f"127.0.0.1:{controller.port}"
    result = subprocess.run(
        [SWAKS, "--server", server, "--to", f"r@{DOMAIN}", "--timeout", "10"],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode != 0
    output = result.stdout.decode()
    final = output[output.rindex(" -> .") :]
    assert "<** 450" in final and "<- 250" not in final, output


def test_recipients_refused_live_per_rcpt(serve: Any, loop_thread: LoopThread, caplog: Any) -> None:
    """The next hop refuses one of two recipients: that RCPT gets its 550, the message is
    relayed for the other one only, and the refusal is logged."""

    def answer(line: bytes, transaction: int) -> bytes | None:
        if line.upper().startswith(b"RCPT") and b"good" not in line:
            return b"550 5.1.1 no\x07 such user\r\n"
        return None

    hop = FakeNextHop(lambda r, w, h: smtp_dialogue(r, w, h, answer), loop_thread).start()
    controller = serve(relay(hop.next_hop))
    with caplog.at_level("INFO", logger="farm.relay"):
        result = attempt(controller.port, [f"good@{DOMAIN}", f"bad@{DOMAIN}"], b"x\r\n")
    assert result.rcpt[0][0] == 250
    assert result.rcpt[1] == (550, b"5.1.1 no? such user")  # the next hop's text, printable
    assert result.final is not None and result.final[0] == 250
    assert len(hop.messages) == 1 and b"for <good@farm.test>" in hop.messages[0]
    rcpts = [line for line in hop.lines if line.upper().startswith(b"RCPT")]
    assert len(rcpts) == 2  # each forwarded once, live
    lines = [r.getMessage() for r in caplog.records if r.name == "farm.relay"]
    assert any("refused=1" in m and "bad@farm.test" in m for m in lines), lines


def test_lmtp_next_hop_partial_refusal_is_451_for_all(
    serve: Any, loop_thread: LoopThread, caplog: Any
) -> None:
    """An LMTP next hop that takes the data for one recipient but not the other: the SMTP
    client is told 451 for the whole message (a duplicate is possible, a loss is not)."""

    async def lmtp(reader: Any, writer: Any, hop: FakeNextHop) -> None:
        writer.write(b"220 fake LMTP\r\n")
        rcpts: list[bytes] = []
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"RCPT":
                rcpts.append(line)
            if verb == b"DATA":
                writer.write(b"354 go\r\n")
                while await reader.readline() != b".\r\n":
                    pass
                hop.messages.append(b"x")
                for rcpt in rcpts:
                    writer.write(b"250 ok\r\n" if b"good" in rcpt else b"452 4.2.2 full\r\n")
                rcpts.clear()
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    hop = FakeNextHop(lmtp, loop_thread).start()
    controller = serve(relay(f"lmtp:{hop.next_hop}"))
    with caplog.at_level("INFO", logger="farm.relay"):
        result = attempt(controller.port, [f"good@{DOMAIN}", f"full@{DOMAIN}"], b"x\r\n")
        everyone = attempt(controller.port, [f"good@{DOMAIN}", f"good2@{DOMAIN}"], b"x\r\n")
    assert (
        result.final is not None and result.final[0] == 451 and result.final[1].startswith(b"4.3.0")
    )
    assert everyone.accepted
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("partial_delivery" in m and "full@farm.test" in m for m in warnings), warnings


def test_next_hop_down(serve: Any, caplog: Any) -> None:
    controller = serve(relay(f"127.0.0.1:{free_port()}"))
    with caplog.at_level("INFO", logger="farm.relay"):
        result = attempt(controller.port, [f"r@{DOMAIN}", f"s@{DOMAIN}"], message("down"))
    assert result.final is None
    assert result.rcpt == [(451, b"4.4.1 Next hop unavailable, try again later")] * 2
    records = [r for r in caplog.records if r.name == "farm.relay"]
    assert len(records) == 1  # one line per transaction, not per recipient
    assert records[0].exc_info is None and "error=ConnectionRefusedError" in records[0].getMessage()


def test_next_hop_hangs_at_data(serve: Any, sink: Any) -> None:
    next_hop = sink("-w", "30")
    controller = serve(relay(next_hop.next_hop, timeout=2.0))
    started = time.monotonic()
    result = attempt(controller.port, [f"r@{DOMAIN}"], message("hang"))
    elapsed = time.monotonic() - started
    assert result.final is not None and result.final[0] == 451, result
    assert elapsed < 2.0 + 5.0


def test_next_hop_never_greets(serve: Any) -> None:
    with taken_port() as port:  # accepts in the kernel backlog, never says a word
        controller = serve(relay(f"127.0.0.1:{port}", timeout=1.0))
        started = time.monotonic()
        result = attempt(controller.port, [f"r@{DOMAIN}"], message("mute"))
        assert result.final is None, result
        code, text = result.rcpt[0]
        assert code == 451 and text.startswith(b"4.4.2"), text
        assert time.monotonic() - started < 1.0 + 5.0


def source_args(port: int) -> list[str]:
    """smtp-source's options for one sender and recipient, and the server (last)."""
    return ["-M", "client.test", "-f", "a@ext.test", "-t", f"r@{DOMAIN}", f"127.0.0.1:{port}"]


# -- exactly once ------------------------------------------------------------------------------


def test_smtp_source_every_250_arrives_exactly_once(serve: Any, sink: Any) -> None:
    """smtp-source sends 25 messages with 2 recipients each over one session, then 6 sessions
    of 3 in parallel; smtp-source stops at the first reply that is not 2xx, so a zero exit is
    a 250 for every message, and the sink must hold each one exactly once."""
    next_hop = sink()
    controller = serve(relay(next_hop.next_hop))
    marker = f"source-{uuid.uuid4().hex}"
    runs = [(["-d", "-m", "25", "-r", "2"], 25), (["-s", "6", "-m", "18"], 18)]
    total = 0
    for options, count in runs:
        result = subprocess.run(
            [SMTP_SOURCE, *options, "-S", marker, *source_args(controller.port)],
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr.decode()
        total += count
        dump = next_hop.wait_for(f"Subject: {marker}".encode(), total)
    dump = next_hop.text()
    assert dump.count(f"Subject: {marker}".encode()) == total
    assert dump.count(b"(farm)") == total


def test_smtp_source_gets_no_250_from_a_failing_next_hop(serve: Any, sink: Any) -> None:
    next_hop = sink("-f", ".")
    controller = serve(relay(next_hop.next_hop))
    result = subprocess.run(
        [SMTP_SOURCE, "-d", "-m", "3", *source_args(controller.port)],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert b"500" in result.stderr or b"5.3.0" in result.stderr, result.stderr


# -- content -----------------------------------------------------------------------------------


def test_stray_line_ends_never_reach_next_hop(serve: Any, sink: Any) -> None:
    next_hop = sink()
    controller = serve(relay(next_hop.next_hop))
    marker = f"stray-{uuid.uuid4().hex}"
    body = (
        f"Subject: {marker}\r\n\r\n"
        "lf-before\nlf-after\r\n"
        "cr-before\rcr-after\r\n"
        "nul-before\x00nul-after\r\n"
        "smuggle\n.\nMAIL FROM:<evil@ext.test>\r\n"
        "..leading dot\r\n"  # the client's dot-stuffing of ".leading dot"
        f"end-{marker}\r\n"
    ).encode()
    with SMTPClient(controller.port, greeting=True) as raw:
        for command in ("HELO raw.test", "MAIL FROM:<a@ext.test>", f"RCPT TO:<r@{DOMAIN}>"):
            assert raw.command(command).startswith("250")
        assert raw.command("DATA").startswith("354")
        raw.send(body + b".\r\n")
        reply = raw.reply()
        raw.send(b"QUIT\r\n")
    if not reply.startswith("250"):  # the engine may refuse such content outright: also fine
        assert reply[:1] in ("4", "5")
        assert marker.encode() not in next_hop.text()
        return
    dump = next_hop.wait_for(f"end-{marker}".encode())
    assert b"lf-before lf-after\n" in dump
    assert b"cr-before cr-after\n" in dump
    assert b"nul-before nul-after\n" in dump
    assert b"smuggle . MAIL FROM:<evil@ext.test>\n" in dump
    assert b"\n.leading dot\n" in dump  # stuffed again towards the next hop, which unstuffs
    assert b"\r" not in dump and b"\x00" not in dump
    assert dump.count(b"Subject: " + marker.encode()) == 1


def test_clean_content_and_dot_stuffing() -> None:
    assert clean_content(b"a\nb\rc\x00d\r\n") == b"a b c d\r\n"
    assert clean_content(b"a\r\r\nb") == b"a \r\nb\r\n"
    assert clean_content(b"") == b""
    assert dot_stuff(b".a\r\nb\r\n.\r\n") == b"..a\r\nb\r\n..\r\n.\r\n"


def test_received_header_is_safe() -> None:
    handler = relay("127.0.0.1:1", hostname="mx(1).farm.test")
    session = SimpleNamespace(
        peer=("127.0.0.1", 5),
        proxy_data=None,
        host_name="evil\r\nX-Injected: yes (x);",
        extended_smtp=True,
        ssl=None,
        authenticated=False,
        id="s1",
    )
    envelope = SimpleNamespace(rcpt_tos=["r@farm.test", "s@farm.test"])
    header = handler.received_header(SimpleNamespace(hostname="ignored"), session, envelope)
    assert header.endswith(b"\r\n") and header.count(b"\r\n") == 3
    assert all(line.startswith(b"\t") for line in header.split(b"\r\n")[1:-1])
    assert b"\nX-Injected" not in header
    assert b"for <" not in header  # recipients are not disclosed for several
    parsed = BytesHeaderParser(policy=email.policy.strict).parsebytes(header + b"\r\n")
    assert parsed["Received"].startswith("from evil__X-Injected:_yes__x__ ([127.0.0.1])")
    assert "by mx_1_.farm.test (farm) with ESMTP id s1;" in str(parsed["Received"])


def test_smtputf8_address(serve: Any, sink: Any) -> None:
    next_hop = sink()
    with smtplib.SMTP("127.0.0.1", next_hop.port, timeout=WAIT) as probe:
        probe.ehlo("probe.test")
        sink_has_utf8 = probe.has_extn("smtputf8")
    controller = serve(relay(next_hop.next_hop))
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("client.test")
        assert client.mail("a@ext.test", ["SMTPUTF8"])[0] == 250
        code, text = client.rcpt(f"jürgen@{DOMAIN}")
        if sink_has_utf8:
            assert code == 250, text
            code, text = client.data(message("utf8"))
    if sink_has_utf8:
        assert code == 250, text
        assert "X-Rcpt-Args: <jürgen@farm.test>".encode() in next_hop.wait_for(b"Subject: utf8")
    else:  # refused live, at RCPT
        assert (code, text[:5]) == (553, b"5.6.7")


def test_undeclared_unicode_recipient_is_refused_alone(serve: Any, sink: Any) -> None:
    """Without SMTPUTF8 in MAIL, a UTF-8 recipient gets 553; the ASCII ones still go through."""
    from tests.support.client import SMTPClient

    next_hop = sink()
    controller = serve(relay(next_hop.next_hop))
    client = SMTPClient(controller.port)
    try:
        client.reply()
        client.command("EHLO client.test")
        assert client.command("MAIL FROM:<a@ext.test>").startswith("250")
        assert client.command(f"RCPT TO:<jürgen@{DOMAIN}>").startswith("553 5.6.7")
        assert client.command(f"RCPT TO:<bob@{DOMAIN}>").startswith("250")
        assert client.command("DATA").startswith("354")
        client.send(message("ascii-after-utf8").decode() + ".\r\n")
        assert client.reply().startswith("250")
    finally:
        client.close()
    assert b"Subject: ascii-after-utf8" in next_hop.wait_for(b"Subject: ascii-after-utf8")
