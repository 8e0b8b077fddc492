"""Fewer round trips to the next hop, same guarantees: ``MAIL FROM`` and the first ``RCPT TO``
in one write when the next hop offers PIPELINING (RFC 2920), the content as one
``BDAT <size> LAST`` when it offers CHUNKING (RFC 3030), else ``DATA`` and its ``354``.

Next hops: ``smtp-sink`` (PIPELINING, no CHUNKING; ``-p`` turns PIPELINING off), farm's own
engine with ``pipelining``/``chunking`` and a recording handler (SMTP and LMTP), and scripted
fake next hops that answer ``MAIL`` only once the ``RCPT`` after it has arrived (so a relay
that does not pipeline hangs). A counting proxy in front records what the relay wrote.
"""

from __future__ import annotations

import smtplib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from farm.controller import Controller
from farm.lmtp import LMTP
from farm.smtp import SMTP
from tests.support.relay import (
    DOMAIN,
    HAVE_SINK,
    CountingProxy,
    FakeNextHop,
    LoopThread,
    attempt,
    message,
    smtp_dialogue,
)
from tests.support.relay import make_relay as relay
from tests.support.wait import WAIT

CRLF = b"\r\n"


class Recorder:
    """A next hop's handler: keeps each message; per-recipient replies for LMTP (``full`` in
    the address: ``452``)."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []
        self.received = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str | list[str]:
        self.contents.append(bytes(envelope.original_content))
        self.received.set()
        if isinstance(server, LMTP):
            return ["452 4.2.2 full" if "full" in r else "250 OK" for r in envelope.rcpt_tos]
        return "250 OK"


class LMTPController(Controller):
    def factory(self) -> SMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def lmtp_next_hop() -> Iterator[Callable[..., Controller]]:
    """Factory: ``lmtp_next_hop(handler, **kwargs)`` -> farm's LMTP engine, stopped at the end."""
    started: list[Controller] = []

    def start(handler: Any, **kwargs: Any) -> Controller:
        controller = LMTPController(
            handler, hostname="127.0.0.1", port=0, server_hostname="lmtp.test", **kwargs
        )
        controller.start()
        started.append(controller)
        return controller

    yield start
    for controller in started:
        controller.stop()


def tricky(marker: str) -> bytes:
    """A message whose lines a broken dot-stuffing or line-end handling would change."""
    lines = [
        b"From: a@ext.test",
        f"To: r@{DOMAIN}".encode(),
        f"Subject: {marker}".encode(),
        b"",
        b".",
        b"..",
        b"...",
        b".leading dot",
        b"..two leading dots",
        b" .",
        b"ends with a dot .",
        b"",
        b"BDAT 5 LAST",
        b"DATA",
        b"",
        f"end-{marker}".encode(),
    ]
    return CRLF.join(lines) + CRLF


def large(marker: str) -> bytes:
    """About 1 MB, every third line starting with a dot."""
    head = f"From: a@ext.test\r\nSubject: {marker}\r\n\r\n".encode()
    body = b"".join(
        (b"." if i % 3 == 0 else b"") + b"%08d " % i + b"x" * 70 + CRLF for i in range(13_000)
    )
    return head + body + f"end-{marker}\r\n".encode()


def received_then(content: bytes, original: bytes) -> None:
    """``content`` is our ``Received:`` header and then ``original``, byte for byte."""
    assert content.endswith(original), (content[:300], original[:300])
    header = content[: len(content) - len(original)]
    assert header.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby "), header
    lines = header.split(CRLF)
    assert lines[-1] == b"" and all(line.startswith(b"\t") for line in lines[1:-1]), header
    assert b"(farm)" in header, header


def sent_in_one_read(proxy: CountingProxy, start: bytes, then: bytes) -> bool:
    """Some read at the proxy starts with ``start`` and also holds ``then`` (one write)."""
    return any(read.startswith(start) and then in read for read in proxy.reads)


def farm_next_hop(make_controller: Any, loop_thread: LoopThread, **kwargs: Any) -> Any:
    recorder = Recorder()
    next_hop = make_controller(recorder, **kwargs)
    return recorder, CountingProxy(loop_thread, next_hop.port)


# -- content arrives byte-exact, via BDAT and via DATA -----------------------------------------


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_content_byte_exact_to_farm_next_hop(
    make_controller: Any, serve: Any, loop_thread: LoopThread, chunking: bool
) -> None:
    recorder, proxy = farm_next_hop(
        make_controller, loop_thread, pipelining=True, chunking=chunking
    )
    controller = serve(relay(proxy.next_hop))
    marker = uuid.uuid4().hex
    messages = [tricky(marker), large(marker), b"Subject: no final line end\r\n\r\nx"]
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("client.test")
        for data in messages:
            assert client.sendmail("a@ext.test", [f"r@{DOMAIN}"], data) == {}
    assert len(recorder.contents) == 3  # each 250 came after the next hop's
    received_then(recorder.contents[0], messages[0])
    received_then(recorder.contents[1], messages[1])
    received_then(recorder.contents[2], messages[2] + CRLF)
    assert proxy.accepted == 1
    sent = bytes(proxy.sent)
    mail_rcpt = f"MAIL FROM:<a@ext.test>\r\nRCPT TO:<r@{DOMAIN}>\r\n".encode()
    assert sent.count(mail_rcpt) == 3
    assert sent_in_one_read(proxy, b"MAIL FROM:", b"RCPT TO:")
    # (The content has "DATA" and "BDAT 5 LAST" lines of its own.)
    if chunking:
        for content in recorder.contents:
            assert b"\r\nBDAT %d LAST\r\n" % len(content) + content in sent
        assert b"DATA\r\nReceived: " not in sent and sent.count(b"LAST\r\nReceived: ") == 3
        assert sent_in_one_read(proxy, b"BDAT ", b"Received: from client.test")
    else:
        assert sent.count(b"\nDATA\r\nReceived: ") == 3 and b"LAST\r\nReceived: " not in sent
        assert b"\r\n..\r\n...\r\n....\r\n..leading dot\r\n" in sent  # dot-stuffed


@pytest.mark.skipif(not HAVE_SINK, reason="smtp-sink not installed")
@pytest.mark.parametrize("options", [(), ("-p",)], ids=["pipelining", "no-pipelining"])
def test_content_byte_exact_to_smtp_sink(
    serve: Any, sink: Any, loop_thread: LoopThread, options: tuple[str, ...]
) -> None:
    next_hop = sink(*options)
    proxy = CountingProxy(loop_thread, next_hop.port)
    controller = serve(relay(proxy.next_hop))
    marker = uuid.uuid4().hex
    messages = [tricky(marker), large(marker)]
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("client.test")
        for data in messages:
            assert client.sendmail("a@ext.test", [f"r@{DOMAIN}"], data) == {}
    dump = next_hop.wait_for(f"end-{marker}".encode(), 2)
    for data in messages:  # the sink's dump has LF line ends
        assert dump.count(data.replace(CRLF, b"\n")) == 1
    assert dump.count(b"(farm)") == 2
    pipelined = sent_in_one_read(proxy, b"MAIL FROM:", b"RCPT TO:")
    assert pipelined == (options == ())
    assert b"LAST\r\nReceived: " not in proxy.sent  # smtp-sink offers no CHUNKING


# -- pipelining: MAIL + first RCPT in one write, later recipients live -------------------------


@pytest.mark.parametrize("chunking", [False, True], ids=["data", "bdat"])
def test_mail_and_first_rcpt_pipelined(serve: Any, loop_thread: LoopThread, chunking: bool) -> None:
    """The fake next hop answers MAIL only after the RCPT following it arrived: without the
    pipelined pair the relay would time out. Later recipients go one by one."""

    def answer(line: bytes, transaction: int) -> bytes | None:
        if line.upper().startswith(b"RCPT") and b"bad" in line:
            return b"550 5.1.1 no such user\r\n"
        return None

    hop = FakeNextHop(
        lambda r, w, h: smtp_dialogue(r, w, h, answer, pipelining=True, chunking=chunking),
        loop_thread,
    ).start()
    controller = serve(relay(hop.next_hop, timeout=3.0))
    rcpts = [f"r1@{DOMAIN}", f"bad@{DOMAIN}", f"r3@{DOMAIN}"]
    result = attempt(controller.port, rcpts, message("pair"))
    assert [code for code, _ in result.rcpt] == [250, 550, 250], result
    assert result.accepted, result
    verbs = [line.split(b":")[0].split()[0].upper() for line in hop.lines]
    assert verbs == [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"RCPT"] + (
        [b"BDAT"] if chunking else [b"DATA"]
    )
    assert len(hop.messages) == 1 and b"Subject: pair" in hop.messages[0]
    if chunking:
        assert hop.lines[-1] == b"BDAT %d LAST\r\n" % len(hop.messages[0])


@pytest.mark.parametrize("refusal", [b"550 5.7.1 sender refused", b"451 4.7.1 try later"])
def test_mail_refused_by_pipelining_next_hop(
    serve: Any, loop_thread: LoopThread, refusal: bytes
) -> None:
    """The MAIL's refusal is the answer to the RCPT pipelined with it (the RCPT's own 503 is
    never shown); each recipient tries MAIL again; the clean connection is reused."""

    def answer(line: bytes, transaction: int) -> bytes | None:
        if transaction <= 2 and line.upper().startswith(b"MAIL"):
            return refusal + CRLF
        if transaction <= 2 and line.upper().startswith(b"RCPT"):
            return b"503 5.5.1 Error: need MAIL command\r\n"
        return None

    hop = FakeNextHop(
        lambda r, w, h: smtp_dialogue(r, w, h, answer, pipelining=True), loop_thread
    ).start()
    controller = serve(relay(hop.next_hop, timeout=3.0))
    code, text = int(refusal[:3]), refusal[4:]
    result = attempt(controller.port, [f"r@{DOMAIN}", f"s@{DOMAIN}"], message("refused"))
    assert result.rcpt == [(code, text), (code, text)] and result.final is None, result
    assert attempt(controller.port, [f"r@{DOMAIN}"], message("later")).accepted
    assert len(hop.messages) == 1 and b"Subject: later" in hop.messages[0]
    assert hop.connections == 1


def test_pipelined_rcpt_421_ends_the_transaction(serve: Any, loop_thread: LoopThread) -> None:
    def answer(line: bytes, transaction: int) -> bytes | None:
        return b"421 4.3.2 closing\r\n" if line.upper().startswith(b"RCPT") else None

    hop = FakeNextHop(
        lambda r, w, h: smtp_dialogue(r, w, h, answer, pipelining=True), loop_thread
    ).start()
    controller = serve(relay(hop.next_hop, timeout=3.0))
    result = attempt(controller.port, [f"r@{DOMAIN}", f"s@{DOMAIN}"], message("closing"))
    assert result.rcpt == [(451, b"4.3.2 closing")] * 2 and result.final is None, result
    assert sum(line.upper().startswith(b"MAIL") for line in hop.lines) == 1


# -- LMTP next hop: BDAT LAST gets one reply per recipient -------------------------------------


def test_lmtp_next_hop_bdat_replies_per_recipient(
    serve: Any, loop_thread: LoopThread, lmtp_next_hop: Any
) -> None:
    recorder = Recorder()
    next_hop = lmtp_next_hop(recorder, pipelining=True, chunking=True)
    proxy = CountingProxy(loop_thread, next_hop.port)
    controller = serve(relay(f"lmtp:{proxy.next_hop}", timeout=3.0))
    marker = uuid.uuid4().hex
    everyone = attempt(controller.port, [f"a@{DOMAIN}", f"b@{DOMAIN}"], tricky(marker))
    assert everyone.accepted, everyone
    partial = attempt(controller.port, [f"a@{DOMAIN}", f"full@{DOMAIN}"], message("partial"))
    assert partial.final is not None and partial.final[0] == 451, partial
    assert partial.final[1].startswith(b"4.3.0")
    received_then(recorder.contents[0], tricky(marker))
    for content in recorder.contents:
        assert b"\r\nBDAT %d LAST\r\n" % len(content) + content in proxy.sent
    assert b"DATA\r\nReceived: " not in proxy.sent
    assert proxy.accepted == 1  # every reply read: the connection stayed in step
