"""Hostile clients against a real Controller, over raw sockets.

SMTP smuggling vectors V1-V16 (security notes 1.4), over-long lines, over-size data, bad bytes
in commands, unknown-command and recipient limits, pipelining, idle timeouts, failing handlers,
a client that never reads, and swaks as an independent client.

Every client socket has a 10 s timeout; replies are read until the server closes, so a test
sees every reply the server sent. The only sleeps are in the idle-timeout tests, where the
passing of time is what is tested.
"""

from __future__ import annotations

import select
import shutil
import socket
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.client import Reply, SMTPClient, codes
from tests.support.logcheck import logged_errors
from tests.support.loops import both_loops  # noqa: F401  (loop_kind: asyncio and uvloop)
from tests.support.smuggling import LOOKALIKES
from tests.support.wait import wait_for

TIMEOUT = 10.0
HOST = "farm.test"


# -- no tracebacks for client mistakes ----------------------------------------------------------


class HandlerBoom(Exception):
    """Raised on purpose by a test handler; the only traceback a log may carry."""


@pytest.fixture(autouse=True)
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """After each test (controllers stopped), no ERROR record and no traceback in the log,
    except the deliberate :class:`HandlerBoom`."""
    yield
    bad = logged_errors(caplog, (HandlerBoom,), phases=("setup", "call", "teardown"))
    assert not bad, bad


# -- transactions -------------------------------------------------------------------------------

EHLO = b"EHLO client.example\r\n"
ENVELOPE = b"MAIL FROM:<a@b>\r\nRCPT TO:<v@local>\r\n"
HEADERS = b"From: a@b\r\nTo: v@local\r\nSubject: hello\r\n\r\n"
SMUGGLED = (
    b"MAIL FROM:<smuggled@x>\r\nRCPT TO:<v@local>\r\nDATA\r\n"
    b"From: smuggled@x\r\nTo: v@local\r\n\r\nsmuggled body"
)
#: greeting, EHLO, MAIL, RCPT, 354, final reply, 221
ONE_MESSAGE = [220, 250, 250, 250, 354, 250, 221]


def unstuff(body: bytes) -> bytes:
    """Content of a raw DATA body ending in CRLF: drop the first dot of each CRLF line."""
    lines = body.split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def transaction(raw_body: bytes) -> bytes:
    """EHLO, MAIL, RCPT, DATA, ``raw_body`` (ending in CRLF), the dot line, QUIT."""
    return EHLO + ENVELOPE + b"DATA\r\n" + raw_body + b".\r\nQUIT\r\n"


def run_session(controller: Any, stream: bytes, bytewise: bool = False) -> list[Reply]:
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
        client.send(stream, bytewise)
        return client.replies_until_close()


def delivered(handler: Any, count: int = 1) -> list[Any]:
    """The handler's envelopes, once ``count`` of them are in (bounded wait)."""
    wait_for(lambda: len(handler.envelopes) >= count, f"{count} deliveries")
    return handler.envelopes


# -- SMTP smuggling -----------------------------------------------------------------------------

WRITES = pytest.mark.parametrize("bytewise", [False, True], ids=["one-write", "1-byte-writes"])


@WRITES
@pytest.mark.parametrize("name", list(LOOKALIKES))
def test_smuggling_lookalike_is_content(
    make_controller: Any, handler: Any, name: str, bytewise: bool
) -> None:
    raw_body = HEADERS + b"body" + LOOKALIKES[name] + SMUGGLED + b"\r\n"
    replies = run_session(make_controller(handler), transaction(raw_body), bytewise)
    # exactly one final reply, after the real terminator; nothing for the smuggled commands
    assert codes(replies) == ONE_MESSAGE, [r.text for r in replies]
    assert replies[5].text == "250 OK"
    assert len(handler.envelopes) == 1
    envelope = handler.envelopes[0]
    assert envelope.mail_from == "a@b"
    assert envelope.rcpt_tos == ["v@local"]
    assert envelope.content == unstuff(raw_body)
    assert b"MAIL FROM:<smuggled@x>" in envelope.content  # the smuggled part is content
    if name == "V15":
        assert b"body\r\n.\r\nMAIL FROM:<smuggled@x>\r\n" in envelope.content


@WRITES
def test_smuggling_control_real_terminator_runs_the_second_transaction(
    make_controller: Any, handler: Any, bytewise: bool
) -> None:
    """V16 is the real terminator: what follows is a second, legitimate transaction.
    This is the outcome the lookalike tests above must never show."""
    raw_body = HEADERS + b"body" + b"\r\n.\r\n" + SMUGGLED + b"\r\n"
    replies = run_session(make_controller(handler), transaction(raw_body), bytewise)
    assert codes(replies) == [220, 250, 250, 250, 354, 250, 250, 250, 354, 250, 221]
    first, second = delivered(handler, 2)
    assert first.content == HEADERS + b"body\r\n"
    assert second.mail_from == "smuggled@x"


@WRITES
def test_v16_delivers_the_exact_bytes(make_controller: Any, handler: Any, bytewise: bool) -> None:
    every_octet = bytes(b for b in range(256) if b not in b"\r\n")
    lines = [
        b"Subject: exact",
        b"",
        every_octet,
        b".leading dot",
        b"..two dots",
        b".",
        b"bare\rCR and bare\nLF and NUL\x00",
        b" trailing space ",
        b"\t",
    ]
    content = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)
    replies = run_session(make_controller(handler), transaction(stuffed), bytewise)
    assert codes(replies) == ONE_MESSAGE
    (envelope,) = handler.envelopes
    assert envelope.content == content
    assert envelope.original_content == content


# -- over-long command lines --------------------------------------------------------------------


@pytest.mark.parametrize("smtputf8", [False, True])
def test_command_line_limit(make_controller: Any, handler: Any, smtputf8: bool) -> None:
    controller = make_controller(handler, enable_SMTPUTF8=smtputf8)
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
        assert client.reply().code == 220
        assert client.command(b"NOOP " + b"x" * 508).text == "500 Command line too long"  # 513
        assert client.command(b"NOOP " + b"x" * 507).text == "250 OK"  # 512
        assert client.command(b"EHLO client.example").code == 250
        # ESMTP: MAIL may be 26 octets longer with SIZE, 10 more with SMTPUTF8
        mail_limit = 512 + 26 + (10 if smtputf8 else 0)
        head, tail = b"MAIL FROM:<", b"@b> SIZE=100"
        fits = head + b"l" * (mail_limit - len(head) - len(tail)) + tail
        assert len(fits) == mail_limit
        assert client.command(fits[:10] + b"k" + fits[10:]).text == "500 Command line too long"
        assert client.command(fits).text == "250 OK"
        assert client.command(b"QUIT").text == "221 Bye"


def test_ten_mib_command_line_without_crlf(controller: Any) -> None:
    payload = b"NOOP " + b"x" * (10 * 2**20)
    view = memoryview(payload)
    tracemalloc.start()
    try:
        with SMTPClient.of(controller, timeout=TIMEOUT) as client:
            assert client.reply().code == 220
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            for start in range(0, len(payload), 2**20):
                client.send(view[start : start + 2**20])
            client.send(b"\r\nNOOP\r\nQUIT\r\n")
            replies = client.replies_until_close()
            peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert [r.text for r in replies] == ["500 Command line too long", "250 OK", "221 Bye"]
    assert peak < 4 * 2**20, f"server buffered {peak} bytes for an over-long line"


# -- DATA line length and size ------------------------------------------------------------------


def test_data_line_of_1001_octets_refused_after_terminator(
    make_controller: Any, handler: Any
) -> None:
    raw_body = HEADERS + b"x" * 1001 + b"\r\nmore\r\n"
    stream = EHLO + ENVELOPE + b"DATA\r\n" + raw_body + b".\r\nRSET\r\nQUIT\r\n"
    replies = run_session(make_controller(handler), stream)
    assert codes(replies) == [220, 250, 250, 250, 354, 500, 250, 221]
    assert replies[5].text == "500 Line too long (see RFC5321 4.5.3.1.6)"
    assert handler.envelopes == []


@pytest.mark.parametrize(
    ("wire_line", "content_line"),
    [
        (b"x" * 1000, b"x" * 1000),
        (b".." + b"y" * 999, b"." + b"y" * 999),  # 1000 octets plus a stuffing dot
        (b"." + b"z" * 1000, b"z" * 1000),  # a needless stuffing dot is not counted either
    ],
    ids=["1000", "1000+stuffing-dot", "dot+1000"],
)
def test_data_line_of_1000_octets_accepted(
    make_controller: Any, handler: Any, wire_line: bytes, content_line: bytes
) -> None:
    raw_body = HEADERS + wire_line + b"\r\n"
    replies = run_session(make_controller(handler), transaction(raw_body))
    assert codes(replies) == ONE_MESSAGE
    assert handler.envelopes[0].content == HEADERS + content_line + b"\r\n"


def test_huge_data_line_memory_bounded(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, data_size_limit=None)
    line = b"L" * (16 * 2**20)
    view = memoryview(line)
    tracemalloc.start()
    try:
        with SMTPClient.of(controller, timeout=TIMEOUT) as client:
            client.send(EHLO + ENVELOPE + b"DATA\r\n" + HEADERS)
            assert codes([client.reply() for _ in range(5)]) == [220, 250, 250, 250, 354]
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            for start in range(0, len(line), 2**20):
                client.send(view[start : start + 2**20])
            client.send(b"\r\n.\r\n")
            assert client.reply().text == "500 Line too long (see RFC5321 4.5.3.1.6)"
            peak = tracemalloc.get_traced_memory()[1] - base
            replies = run_rest(client, transaction(b"fine\r\n")[len(EHLO) :])
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"server buffered {peak} bytes for an over-long DATA line"
    assert codes(replies) == [250, 250, 354, 250, 221]
    assert [e.content for e in handler.envelopes] == [b"fine\r\n"]


def run_rest(client: SMTPClient, stream: bytes) -> list[Reply]:
    client.send(stream)
    return client.replies_until_close()


def test_too_much_data(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, data_size_limit=10000)
    big = (b"0123456789" * 7 + b"\r\n") * 300  # 21600 octets
    small = b"small\r\n" * 1000  # 7000 octets
    stream = (
        EHLO
        + ENVELOPE
        + b"DATA\r\n"
        + big
        + b".\r\nRSET\r\n"
        + ENVELOPE
        + b"DATA\r\n"
        + small
        + b".\r\nQUIT\r\n"
    )
    replies = run_session(controller, stream)
    assert codes(replies) == [220, 250, 250, 250, 354, 552, 250, 250, 250, 354, 250, 221]
    assert replies[5].text == "552 Error: Too much mail data"
    assert [e.content for e in delivered(handler)] == [small]


def test_mail_size_parameter_over_limit(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, data_size_limit=10000)
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
        client.send(EHLO + b"MAIL FROM:<a@b> SIZE=10001\r\nMAIL FROM:<a@b> SIZE=10000\r\nQUIT\r\n")
        replies = client.replies_until_close()
    assert [r.text for r in replies[2:]] == [
        "552 Error: message size exceeds fixed maximum message size",
        "250 OK",
        "221 Bye",
    ]


# -- bad bytes in commands ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<a\x00b@x>",
        b"MAIL FROM:<a\r@b>",
        b"EHLO a\rX-Evil: 1",
        b"NOOP \x00",
        b"RCPT TO:<v@local>\x00",
        b"\x00",
    ],
    ids=["nul-in-mail", "cr-in-mail", "cr-in-ehlo", "nul-noop", "nul-after-rcpt", "nul-only"],
)
def test_control_characters_in_command(controller: Any, line: bytes) -> None:
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
        client.send(EHLO + line + b"\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        replies = client.replies_until_close()
    assert codes(replies) == [220, 250, 501, 250, 250, 221], [r.text for r in replies]


@pytest.mark.parametrize(
    "line",
    ["MAIL FROM:<jürgen@b>", "RCPT TO:<ü@b>", "MAIL FROM:<a@bücher.example>"],
)
def test_non_ascii_without_smtputf8(controller: Any, line: str) -> None:
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
        client.send(EHLO + line.encode() + b"\r\nRSET\r\nQUIT\r\n")
        replies = client.replies_until_close()
    assert [r.text for r in replies[2:]] == ["500 Error: strict ASCII mode", "250 OK", "221 Bye"]


def test_invalid_utf8_with_smtputf8_does_not_break_the_session(
    make_controller: Any, handler: Any
) -> None:
    controller = make_controller(handler, enable_SMTPUTF8=True)
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
        client.send(
            EHLO + b"MAIL FROM:<\xff\xfe@b> SMTPUTF8\r\nRCPT TO:<\xc3@local>\r\nRSET\r\nQUIT\r\n"
        )
        replies = client.replies_until_close()
    assert codes(replies)[-2:] == [250, 221]
    assert len(replies) == 6


STRICT_UTF8_CASES = [
    # (MAIL line, RCPT line, the two replies' texts after EHLO)
    (
        "MAIL FROM:<jürgen@b>".encode(),
        b"RCPT TO:<v@local>",
        ["553 5.6.7 Must declare SMTPUTF8 to send unicode address", "503 Error: need MAIL command"],
    ),
    (
        b"MAIL FROM:<\xff\xfe@b> SMTPUTF8",
        b"RCPT TO:<v@local>",
        ["500 5.5.2 Error: bad UTF-8 syntax", "503 Error: need MAIL command"],
    ),
    (
        b"MAIL FROM:<a@b>",
        "RCPT TO:<ü@local>".encode(),
        ["250 OK", "553 5.6.7 Must declare SMTPUTF8 to send unicode address"],
    ),
    (
        b"MAIL FROM:<a@b> SMTPUTF8",
        b"RCPT TO:<v\xc3@local>",
        ["250 OK", "500 5.5.2 Error: bad UTF-8 syntax"],
    ),
]


@pytest.mark.parametrize(
    ("mail", "rcpt", "texts"),
    STRICT_UTF8_CASES,
    ids=["undeclared-sender", "bad-utf8-sender", "undeclared-recipient", "bad-utf8-recipient"],
)
def test_strict_smtputf8_refuses_undeclared_and_broken_addresses(
    make_controller: Any, handler: Any, mail: bytes, rcpt: bytes, texts: list[str]
) -> None:
    """security notes 6.1 item 10 (farm serve's default): nothing is stored, the session goes
    on (RSET), and the same session then delivers a declared UTF-8 envelope as sent."""
    controller = make_controller(handler, enable_SMTPUTF8=True, strict_smtputf8=True)
    good = "MAIL FROM:<jürgen@b> SMTPUTF8\r\nRCPT TO:<ü@local>\r\nDATA\r\n".encode()
    stream = EHLO + mail + b"\r\n" + rcpt + b"\r\nRSET\r\n" + good + HEADERS + b"x\r\n.\r\n"
    replies = run_session(controller, stream + b"QUIT\r\n")
    assert [r.text for r in replies[2:4]] == texts
    assert codes(replies)[4:] == [250, 250, 250, 354, 250, 221]
    [envelope] = delivered(handler)
    assert (envelope.mail_from, envelope.rcpt_tos) == ("jürgen@b", ["ü@local"])
    assert envelope.smtp_utf8 is True


def test_without_strict_smtputf8_addresses_pass_as_aiosmtpd_takes_them(
    make_controller: Any, handler: Any
) -> None:
    """The engine's default (aiosmtpd's behaviour): an undeclared 8-bit address is taken."""
    controller = make_controller(handler, enable_SMTPUTF8=True)
    stream = EHLO + "MAIL FROM:<jürgen@b>\r\nRCPT TO:<ü@local>\r\nQUIT\r\n".encode()
    assert codes(run_session(controller, stream))[2:] == [250, 250, 221]


@pytest.mark.parametrize(
    "address",
    [b"l" * 65 + b"@b", b"a@" + b"d" * 250 + b".example", b"l" * 300 + b"@b"],
    ids=["local-part-65", "path-257+", "local-part-300"],
)
def test_long_addresses_never_crash(make_controller: Any, handler: Any, address: bytes) -> None:
    controller = make_controller(handler)
    stream = EHLO + b"MAIL FROM:<" + address + b">\r\nRSET\r\nQUIT\r\n"
    replies = run_session(controller, stream)
    assert codes(replies)[:2] == [220, 250]
    assert replies[2].code in (250, 500, 501, 553), replies[2].text
    assert codes(replies)[3:] == [250, 221]


def test_bare_lf_command_accepted(controller: Any) -> None:
    """COMPAT profile: a command ending in bare LF is a command (DATA stays strict)."""
    replies = run_session(controller, b"NOOP\nRSET\r\nQUIT\n")
    assert [r.text for r in replies[1:]] == ["250 OK", "250 OK", "221 Bye"]


# -- limits -------------------------------------------------------------------------------------


def test_unknown_commands_limit(controller: Any) -> None:
    stream = b"".join(b"FOO%d\r\n" % i for i in range(1, 6)) + b"NOOP\r\n"
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
        client.send(stream)
        replies = client.replies_until_close()
    assert [r.text for r in replies] == [
        replies[0].text,
        '500 Error: command "FOO1" not recognized',
        '500 Error: command "FOO2" not recognized',
        '500 Error: command "FOO3" not recognized',
        '500 Error: command "FOO4" not recognized',
        "502 5.5.1 Too many unrecognized commands, goodbye.",
    ]
    assert client.eof


def test_recipient_limit(make_controller: Any, handler: Any) -> None:
    rcpts = [b"r%d@local" % i for i in range(1001)]
    stream = (
        EHLO
        + b"MAIL FROM:<a@b>\r\n"
        + b"".join(b"RCPT TO:<" + r + b">\r\n" for r in rcpts)
        + b"DATA\r\nhi\r\n.\r\nQUIT\r\n"
    )
    replies = run_session(make_controller(handler), stream)
    assert codes(replies) == [220, 250, 250, *[250] * 1000, 452, 354, 250, 221]
    assert replies[1003].text == "452 4.5.3 Error: too many recipients"
    (envelope,) = handler.envelopes
    assert envelope.rcpt_tos == [r.decode() for r in rcpts[:1000]]


def test_pipelined_burst_answered_in_order(make_controller: Any, handler: Any) -> None:
    with SMTPClient.of(make_controller(handler), timeout=TIMEOUT) as client:
        client.send(
            EHLO
            + b"MAIL FROM:<a@b>\r\n"
            + b"RCPT TO:<one@local>\r\nRCPT TO:\r\nRCPT TO:<three@local>\r\n"
            + b"DATA\r\n"
        )
        replies = [client.reply() for _ in range(7)]
        assert codes(replies) == [220, 250, 250, 250, 501, 250, 354]
        assert replies[1].lines[0] == f"250-{HOST}" and replies[1].text == "250 HELP"
        assert replies[4].text.startswith("501 Syntax: RCPT TO: <address>")
        client.send(b"Subject: burst\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        rest = client.replies_until_close()
    assert [r.text for r in rest] == ["250 OK", "221 Bye"]
    (envelope,) = handler.envelopes
    assert envelope.rcpt_tos == ["one@local", "three@local"]
    assert envelope.content == b"Subject: burst\r\n\r\nbody\r\n"


# -- command synchronization (forbid_unauth_pipelining; security notes 6.1 item 5) ------------

SYNC_ERROR = "554 5.5.0 Error: SMTP protocol synchronization"


def forbidding(make_controller: Any, handler: Any, **kwargs: Any) -> Any:
    return make_controller(handler, forbid_unauth_pipelining=True, pipelining=True, **kwargs)


def polite_session(controller: Any, handler: Any) -> None:
    """One message, each command waiting for its reply: always served."""
    before = len(handler.envelopes)
    with SMTPClient.of(controller, timeout=TIMEOUT, greeting=True) as client:
        for line in (b"EHLO client.example", b"MAIL FROM:<a@b>", b"RCPT TO:<v@local>"):
            assert client.command(line).code == 250
        assert client.command(b"DATA").code == 354
        assert client.command(b"polite\r\n.").code == 250
        assert client.command(b"QUIT").code == 221
    assert delivered(handler, before + 1)[before].content == b"polite\r\n"


def test_pipelining_as_rfc_2920_allows_is_served(make_controller: Any, handler: Any) -> None:
    """After EHLO with PIPELINING: a group ending in DATA, then the content after the 354,
    RSET in front of the next group; the 250 for the message comes and QUIT ends it."""
    with SMTPClient.of(forbidding(make_controller, handler), timeout=TIMEOUT) as client:
        client.send(EHLO)
        assert codes([client.reply(), client.reply()]) == [220, 250]
        client.send(ENVELOPE + b"RCPT TO:<w@local>\r\nDATA\r\n")
        assert codes([client.reply() for _ in range(4)]) == [250, 250, 250, 354]
        client.send(HEADERS + b"body\r\n.\r\n")
        assert client.reply().text == "250 OK"
        client.send(b"RSET\r\n" + ENVELOPE + b"QUIT\r\n")
        assert codes(client.replies_until_close()) == [250, 250, 250, 221]
    (envelope,) = delivered(handler)
    assert envelope.rcpt_tos == ["v@local", "w@local"]


@pytest.mark.parametrize(
    ("before", "blast", "first_replies"),
    [
        (b"", EHLO + ENVELOPE, []),  # EHLO must end a group
        (b"", b"HELO client.example\r\n" + ENVELOPE, []),  # so must HELO
        (EHLO, ENVELOPE + b"DATA\r\n" + HEADERS + b"x\r\n.\r\n", [250, 250]),  # before 354
        (EHLO, b"NOOP\r\n" + ENVELOPE, []),  # NOOP must end a group
        (b"HELO client.example\r\n", ENVELOPE, []),  # no PIPELINING after HELO
    ],
    ids=["behind-EHLO", "behind-HELO", "content-before-354", "behind-NOOP", "after-HELO"],
)
def test_sending_on_before_a_reply_is_refused(
    make_controller: Any,
    handler: Any,
    caplog: pytest.LogCaptureFixture,
    before: bytes,
    blast: bytes,
    first_replies: list[int],
) -> None:
    """The blasting client gets 554 5.5.0 instead of the reply it should have waited for, and
    the connection closes: nothing after that point runs, nothing is delivered, and the next
    client is served."""
    caplog.set_level("INFO", logger="farm.smtp")
    controller = forbidding(make_controller, handler)
    with SMTPClient.of(controller, timeout=TIMEOUT, greeting=True) as client:
        if before:
            assert client.command(before.rstrip(b"\r\n")).code == 250
        client.send(blast)
        replies = client.replies_until_close()
    assert codes(replies) == [*first_replies, 554]
    assert replies[-1].text == SYNC_ERROR
    assert handler.envelopes == []
    assert "refused (SMTP protocol synchronization)" in caplog.text
    polite_session(controller, handler)


def test_without_pipelining_offered_any_group_is_refused(
    make_controller: Any, handler: Any
) -> None:
    """pipelining=False: EHLO does not offer PIPELINING, so two commands in one write are one
    too many even where PIPELINING would allow them."""
    controller = make_controller(handler, forbid_unauth_pipelining=True)
    with SMTPClient.of(controller, timeout=TIMEOUT, greeting=True) as client:
        assert "PIPELINING" not in client.command(b"EHLO client.example")
        client.send(ENVELOPE)
        assert [r.text for r in client.replies_until_close()] == [SYNC_ERROR]


def test_bdat_chunks_and_quit_may_have_input_behind_them(
    make_controller: Any, handler: Any
) -> None:
    """RFC 3030: BDAT chunks pipeline (the chunk's octets follow the command); input behind
    QUIT is ignored, not refused."""
    controller = forbidding(make_controller, handler, chunking=True)
    with SMTPClient.of(controller, timeout=TIMEOUT, greeting=True) as client:
        assert client.command(b"EHLO client.example").code == 250
        client.send(ENVELOPE + b"BDAT 6\r\nhello\nBDAT 4 LAST\r\nbye\n")
        assert codes([client.reply() for _ in range(4)]) == [250, 250, 250, 250]
        client.send(b"QUIT\r\nNOOP\r\n")
        assert codes(client.replies_until_close()) == [221]
    (envelope,) = delivered(handler)
    assert envelope.content == b"hello\nbye\n"


def test_by_default_a_blast_is_served_as_aiosmtpd_serves_it(
    make_controller: Any, handler: Any
) -> None:
    """The engine's default (aiosmtpd has no such check): the whole dialogue in one write."""
    assert codes(run_session(make_controller(handler), transaction(b"x\r\n"))) == ONE_MESSAGE


# -- idle timeout: one real-socket test per kind (idle, inside DATA); the rules themselves,
# -- on a fake clock, in tests/unit/test_deadlines.py -----------------------------------------

TIMEOUT_REPLY = f"421 4.4.2 {HOST} Error: timeout exceeded"


def test_idle_timeout_after_greeting(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, timeout=1)
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
        assert client.reply().code == 220
        started = time.monotonic()
        assert client.reply().text == TIMEOUT_REPLY
        elapsed = time.monotonic() - started
        assert client.replies_until_close() == []
    assert 0.8 <= elapsed < 8, elapsed


def test_idle_timeout_after_354(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, timeout=1)
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
        client.send(EHLO + ENVELOPE + b"DATA\r\nSubject: never finished\r\n")
        assert codes([client.reply() for _ in range(5)]) == [220, 250, 250, 250, 354]
        started = time.monotonic()
        assert client.reply().text == TIMEOUT_REPLY
        assert time.monotonic() - started < 8
        assert client.replies_until_close() == []
    assert handler.envelopes == []


# -- failing handlers ---------------------------------------------------------------------------


class FlakyHandler:
    """handle_DATA fails the first time (raising, or returning None), then records."""

    def __init__(self, failure: str) -> None:
        self.failure = failure
        self.calls = 0
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str | None:
        self.calls += 1
        if self.calls == 1:
            if self.failure == "raise":
                raise HandlerBoom("deliberate")
            return None
        self.envelopes.append(envelope)
        return "250 OK"


@pytest.mark.parametrize("failure", ["raise", "none"])
def test_failing_handler_gives_4xx_and_session_continues(
    make_controller: Any, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    handler = FlakyHandler(failure)
    controller = make_controller(handler)
    stream = (
        EHLO
        + ENVELOPE
        + b"DATA\r\nfirst\r\n.\r\nRSET\r\n"
        + ENVELOPE
        + b"DATA\r\nsecond\r\n.\r\nQUIT\r\n"
    )
    replies = run_session(controller, stream)
    assert codes(replies) == [220, 250, 250, 250, 354, 451, 250, 250, 250, 354, 250, 221]
    assert replies[5].text.startswith("451 ")
    assert [e.content for e in handler.envelopes] == [b"second\r\n"]
    # the server thread's log reaches caplog (so the no-traceback check above is real)
    booms = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], HandlerBoom)]
    assert len(booms) == (1 if failure == "raise" else 0)


# -- a client that never reads ------------------------------------------------------------------


def _shrink_server_buffers(controller: Any) -> Any:
    """The protocol of the connection just accepted, with a small kernel send buffer so
    that the server's own flow control (pause writing, then pause reading) engages quickly
    instead of the kernel absorbing megabytes of replies."""
    protocol = controller.smtpd
    sock = protocol.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return protocol


def _fresh_session_works(controller: Any, handler: Any) -> None:
    before = len(handler.envelopes)
    replies = run_session(controller, transaction(b"fresh\r\n"))
    assert codes(replies) == ONE_MESSAGE
    assert handler.envelopes[before].content == b"fresh\r\n"


def _drain(client: SMTPClient, noops: int, finish_sending: Any) -> None:
    """Read the flood's replies in a thread while ``finish_sending()`` completes the flood,
    then QUIT; every NOOP must have been answered, in order."""
    result: list[Any] = []

    def reader() -> None:
        try:
            result.append(client.replies_until_close())
        except BaseException as error:  # reported below
            result.append(error)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    finish_sending()
    client.send(b"QUIT\r\n")
    thread.join(60)
    assert not thread.is_alive(), "flood replies never drained"
    replies = result[0]
    assert not isinstance(replies, BaseException), replies
    assert len(replies) == noops + 1
    assert all(r.text == "250 OK" for r in replies[:-1])
    assert replies[-1].text == "221 Bye"


def test_pipelined_noops_without_reading(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler)
    noops = 20_000
    with SMTPClient.of(controller, timeout=TIMEOUT, small_buffers=True) as client:
        assert client.reply().code == 220
        protocol = _shrink_server_buffers(controller)
        sender = threading.Thread(target=client.send, args=(b"NOOP\r\n" * noops,), daemon=True)
        sender.start()
        # The server answers until its replies back up, then holds the rest unread.
        wait_for(
            lambda: (
                protocol.counts["commands"] == noops
                or protocol.transport.get_write_buffer_size() > 0
            ),
            "the server to process or hold the flood",
        )
        assert protocol.transport.get_write_buffer_size() < 2**20
        _fresh_session_works(controller, handler)

        def finish() -> None:
            sender.join(TIMEOUT)
            assert not sender.is_alive()

        _drain(client, noops, finish)


FLOOD_CHUNK = b"NOOP\r\n" * 1000


def _flood_until_paused(client: SMTPClient, protocol: Any, cap: int = 64 * 2**20) -> int:
    """Pipeline NOOPs without reading until the server pauses reading; the octets sent."""
    client.sock.setblocking(False)
    sent = 0
    while protocol.transport.is_reading():
        assert sent < cap, "the server kept reading a client that never reads"
        try:
            sent += client.sock.send(FLOOD_CHUNK[sent % len(FLOOD_CHUNK) :])
        except BlockingIOError:
            select.select([], [client.sock], [], 0.05)
    client.sock.settimeout(TIMEOUT)
    return sent


def test_flood_until_backpressure(make_controller: Any, handler: Any) -> None:
    """Keep pipelining NOOPs without reading: the server must stop reading (bounded memory)
    instead of buffering without end, and still serve other clients."""
    controller = make_controller(handler)
    with SMTPClient.of(controller, timeout=TIMEOUT, small_buffers=True) as client:
        assert client.reply().code == 220
        protocol = _shrink_server_buffers(controller)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            sent = _flood_until_paused(client, protocol)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert peak < 8 * 2**20, f"{peak} bytes held for a non-reading client"
        _fresh_session_works(controller, handler)
        offset = sent % len(FLOOD_CHUNK)
        tail = FLOOD_CHUNK[offset:] if offset else b""
        _drain(client, (sent + len(tail)) // 6, lambda: client.send(tail))


def test_half_close_inside_data_delivers_nothing(make_controller: Any, handler: Any) -> None:
    with SMTPClient.of(make_controller(handler), timeout=TIMEOUT) as client:
        client.send(EHLO + ENVELOPE + b"DATA\r\nSubject: cut\r\n\r\npartial body\r\n")
        assert codes([client.reply() for _ in range(5)]) == [220, 250, 250, 250, 354]
        client.half_close()
        assert client.replies_until_close() == []
    assert handler.envelopes == []


# -- an independent client ----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_sends_a_message(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler)
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{controller.port}",
            "--to",
            "a@b",
            "--from",
            "c@d",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (envelope,) = delivered(handler)
    assert envelope.mail_from == "c@d"
    assert envelope.rcpt_tos == ["a@b"]
    assert b"This is a test mailing" in envelope.content


def test_data_body_of_a_client_that_does_not_read_stays_bounded(
    make_controller: Any, handler: Any
) -> None:
    """Replies back up right before DATA; the body that follows must not pile up unread."""
    controller = make_controller(handler, data_size_limit=1_000_000)
    with SMTPClient.of(controller, timeout=TIMEOUT, small_buffers=True) as client:
        assert client.reply().code == 220
        protocol = _shrink_server_buffers(controller)
        # The replies back up before DATA is reached (the server then stops processing and
        # reading: issue 12 item 10); the body that follows must not be read meanwhile.
        client.sock.sendall(EHLO + ENVELOPE + b"HELP\r\n" * 2000 + b"DATA\r\n")
        wait_for(lambda: protocol._state.write_paused, "the server's replies to back up")
        client.sock.setblocking(False)
        sent, body = 0, b"x" * 998 + b"\r\n"
        while protocol.transport.is_reading():
            assert sent < 64 * 2**20, "the server kept reading a client that never reads"
            try:
                sent += client.sock.send(body * 64)
            except BlockingIOError:
                select.select([], [client.sock], [], 0.05)
        assert protocol._framer.buffered < 4 * 2**20


def test_eof_during_an_auth_exchange_closes_at_once(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, auth_require_tls=False, timeout=30)
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
        assert client.reply().code == 220
        client.send(b"EHLO me\r\nAUTH LOGIN\r\n")
        replies = [client.reply() for _ in range(2)]
        assert replies[-1].text == "334 VXNlciBOYW1lAA=="  # "User Name\0", as aiosmtpd asks
        started = time.monotonic()
        client.half_close()
        assert client.replies_until_close() == []  # no 451 blaming a handler
        assert time.monotonic() - started < 10


def test_early_talker_is_refused(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, greeting_delay=0.5)
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
        # Talks at once, without waiting for the greeting: refused, nothing runs.
        client.send(EHLO + ENVELOPE + b"DATA\r\nbody\r\n.\r\n")
        assert [r.text for r in client.replies_until_close()] == [
            "554 5.5.0 Error: SMTP protocol synchronization"
        ]
    assert handler.envelopes == []
    # A client that waits for the 220 is served as usual.
    with SMTPClient.of(controller, timeout=TIMEOUT) as client:
        assert client.reply().code == 220
        client.send(transaction(b"patient\r\n"))
        assert codes(client.replies_until_close()) == ONE_MESSAGE[1:]
    assert handler.envelopes[0].content == b"patient\r\n"
