"""The opt-in extensions over real sockets: ENHANCEDSTATUSCODES (RFC 2034/3463), DSN parameters
(RFC 3461), CHUNKING/BDAT (RFC 3030) and LMTP (RFC 2033) with per-recipient replies.

Clients are raw sockets (smtplib can neither pipeline BDAT nor read LMTP's per-recipient
replies). Every socket has a 10 s timeout; nothing sleeps.
"""

from __future__ import annotations

import itertools
import re
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from farm.lmtp import LMTP
from tests.support.client import SMTPClient
from tests.support.logcheck import logged_errors
from tests.support.loops import both_loops  # noqa: F401  (loop_kind: asyncio and uvloop)

TIMEOUT = 10.0
HOST = "farm.test"
LOCAL_ERROR = "451 4.3.0 Requested action aborted: local error"
#: A reply line that carries an enhanced status code: (reply class, enhanced class).
ENHANCED = re.compile(r"^([245])\d\d[ -]([245])\.\d{1,3}\.\d{1,3} \S")
#: A reply line whose text starts with something that looks like an enhanced code.
LOOKS_ENHANCED = re.compile(r"^\d{3}[ -]\d\.\d+\.\d+")
#: A reply line with two enhanced codes in a row.
DOUBLED = re.compile(r"^\d{3}[ -]\d\.\d+\.\d+ \d\.\d+\.\d+")


def enhanced_ok(line: str) -> bool:
    """``line`` carries one enhanced status code, of the reply's own class."""
    m = ENHANCED.match(line)
    return m is not None and m.group(1) == m.group(2) and not DOUBLED.match(line)


@pytest.fixture(autouse=True)
def no_tracebacks(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """No test here may log an ERROR or a traceback (but those provoked on purpose).

    Tests marked xfail (known engine bugs) check their own log, in the test body.
    """
    yield
    if request.node.get_closest_marker("xfail") is not None:
        return
    assert not errors_logged(caplog)


class HandlerBoom(Exception):
    """Raised on purpose by a test handler."""


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    # the errors a test provokes on purpose: HandlerBoom, and handle_DATA giving no reply
    return logged_errors(caplog, (HandlerBoom,), lambda r: "gave no reply" in r.getMessage())


# -- a raw client -------------------------------------------------------------------------------


class Wire(SMTPClient):
    """The raw client, greeted at connect, with EHLO/LHLO and BDAT shorthands."""

    def __init__(self, controller: Any) -> None:
        super().__init__(controller.port, controller.hostname, timeout=TIMEOUT, greeting=True)

    def ehlo(self, verb: str = "EHLO") -> list[str]:
        lines = self.command(f"{verb} client.example").lines
        assert lines[0] == f"250-{HOST}", lines
        return lines

    def bdat(self, chunk: bytes, last: bool = False) -> str:
        self.send(f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk)
        return self.line()

    def assert_closed(self) -> None:
        """The server closed the connection, and sent nothing more before it did."""
        rest = self.read_to_close()
        assert rest == b"", rest


def start_transaction(wire: Wire, *rcpts: str, mail: str = "MAIL FROM:<a@example.com>") -> None:
    assert wire.cmd(mail).startswith("250"), mail
    for rcpt in rcpts or ("b@example.com",):
        assert wire.cmd(f"RCPT TO:<{rcpt}>").startswith("250"), rcpt


def stuffed(content: bytes) -> bytes:
    """``content`` (ending in CRLF) dot-stuffed and terminated for DATA."""
    assert content.endswith(b"\r\n")
    lines = content.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines) + b".\r\n"


# == ENHANCEDSTATUSCODES =========================================================================


def test_enhanced_status_codes_off_by_default(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, enable_SMTPUTF8=False)
    with smtplib.SMTP(controller.hostname, controller.port, timeout=TIMEOUT) as client:
        _, banner = client.ehlo("me")
        assert banner.decode().splitlines() == [HOST, "SIZE 33554432", "8BITMIME", "HELP"]
    with Wire(controller) as wire:
        wire.ehlo()
        assert wire.cmd("MAIL FROM:<a@example.com>") == "250 OK"
        assert wire.cmd("RCPT TO:<b@example.com>") == "250 OK"
        assert wire.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        assert wire.cmd(b"hello\r\n.") == "250 OK"
        assert wire.cmd("DATA") == "503 Error: need RCPT command"
        assert wire.cmd("XYZZY") == '500 Error: command "XYZZY" not recognized'
        assert wire.cmd("QUIT") == "221 Bye"


def test_enhanced_status_codes_on_every_reply(make_controller: Any, handler: Any) -> None:
    controller = make_controller(
        handler, enable_SMTPUTF8=False, enhanced_status_codes=True, data_size_limit=1500
    )
    with Wire(controller) as wire:
        assert wire.greeting.startswith(f"220 {HOST} Python SMTP")
        assert not LOOKS_ENHANCED.match(wire.greeting)
        assert wire.ehlo() == [
            f"250-{HOST}",
            "250-SIZE 1500",
            "250-8BITMIME",
            "250-ENHANCEDSTATUSCODES",
            "250 HELP",
        ]
        script = [
            ("DATA", "503 5.5.1 Error: need RCPT command"),
            ("RCPT TO:<b@example.com>", "503 5.5.1 Error: need MAIL command"),
            ("MAIL", "501 5.5.4 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"),
            ("MAIL FROM:@", "553 5.1.3 Error: malformed address"),  # had one: not doubled
            (
                "MAIL FROM:<a@example.com> SIZE=5000",
                "552 5.3.4 Error: message size exceeds fixed maximum message size",
            ),
            (
                "MAIL FROM:<a@example.com> FOO=BAR",
                "555 5.5.4 MAIL FROM parameters not recognized or not implemented",
            ),
            ("XYZZY", '500 5.5.2 Error: command "XYZZY" not recognized'),
            ("MAIL FROM:<a@example.com>", "250 2.1.0 OK"),
            ("MAIL FROM:<a@example.com>", "503 5.5.1 Error: nested MAIL command"),
            ("RCPT TO:<b@example.com>", "250 2.1.5 OK"),
            (
                "RCPT TO:<c@example.com> FOO=1",
                "555 5.5.4 RCPT TO parameters not recognized or not implemented",
            ),
            ("DATA", "354 End data with <CR><LF>.<CR><LF>"),  # class 3: no enhanced code
            ("Subject: x\r\n\r\nhello\r\n.", "250 2.6.0 OK"),
            ("NOOP", "250 2.0.0 OK"),
            ("RSET", "250 2.0.0 OK"),
            ("RSET x", "501 5.5.4 Syntax: RSET"),
            (
                "VRFY <a@example.com>",
                "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
            ),
            ("EXPN x", "502 5.5.1 EXPN not implemented"),
        ]
        for command, expected in script:
            reply = wire.cmd(command)
            assert reply == expected, command
            assert enhanced_ok(reply) or reply.startswith("354 "), reply
        # Over the size limit: 552 after the terminator, with a code.
        start_transaction(wire)
        assert wire.cmd("DATA").startswith("354")
        assert wire.cmd(b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n.") == (
            "552 5.3.4 Error: Too much mail data"
        )
        # A line over 1000 octets: 500 after the terminator, with a 5.x.x code.
        start_transaction(wire)
        assert wire.cmd("DATA").startswith("354")
        reply = wire.cmd(b"z" * 1001 + b"\r\n.")
        assert reply.startswith("500 5.") and reply.endswith(
            "Line too long (see RFC5321 4.5.3.1.6)"
        )
        assert enhanced_ok(reply)
        help_reply = wire.cmd("HELP")
        assert help_reply.startswith("250 2.0.0 Supported commands: ")
        assert wire.cmd("QUIT") == "221 2.0.0 Bye"
        wire.assert_closed()
    assert len(handler.envelopes) == 1


class CodedReplies:
    """Replies from the handler: multi-line, with and without their own enhanced codes."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        return "250 first line\nsecond line\r\nthird line"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("coded"):
            return "550 5.1.1 <coded@example.com>: Recipient address rejected"
        if address.startswith("plain"):
            return "550 Recipient address rejected"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 Ok: queued as 4F2C"

    async def handle_VRFY(self, server: Any, session: Any, envelope: Any, address: str) -> str:
        return "250-first\r\n250-2.1.5 second has one\r\n250 last"


def test_enhanced_codes_on_handler_replies(make_controller: Any) -> None:
    handler = CodedReplies()
    controller = make_controller(handler, enhanced_status_codes=True)
    with Wire(controller) as wire:
        wire.ehlo()
        wire.send("NOOP\r\n")
        assert wire.reply().lines == [
            "250-2.0.0 first line",
            "250-2.0.0 second line",
            "250 2.0.0 third line",
        ]
        wire.send("VRFY <x@example.com>\r\n")
        lines = wire.reply().lines
        assert lines == ["250-2.0.0 first", "250-2.1.5 second has one", "250 2.0.0 last"]
        assert wire.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 OK"
        assert wire.cmd("RCPT TO:<coded@example.com>") == (
            "550 5.1.1 <coded@example.com>: Recipient address rejected"
        )
        reply = wire.cmd("RCPT TO:<plain@example.com>")
        assert re.fullmatch(r"550 5\.\d{1,3}\.\d{1,3} Recipient address rejected", reply), reply
        assert wire.cmd("RCPT TO:<ok@example.com>") == "250 2.1.5 Recipient ok"
        assert wire.cmd("DATA").startswith("354 ")
        assert wire.cmd(b"hi\r\n.") == "250 2.0.0 Ok: queued as 4F2C"
        assert wire.cmd("QUIT") == "221 2.0.0 Bye"
    assert len(handler.envelopes) == 1


# == DSN ===========================================================================================

DSN_MAIL = "MAIL FROM:<a@example.com> RET=HDRS ENVID=abc+2Bdef"
DSN_RCPT = "RCPT TO:<c@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@example.com"


def test_dsn_parameters_accepted_into_the_options(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, enable_SMTPUTF8=False, dsn=True)
    with Wire(controller) as wire:
        assert "250-DSN" in wire.ehlo()
        assert wire.cmd(DSN_MAIL) == "250 OK"
        assert wire.cmd(DSN_RCPT) == "250 OK"
        assert wire.cmd("RCPT TO:<d@example.com> NOTIFY=NEVER") == "250 OK"
        assert wire.cmd("RCPT TO:<e@example.com> NOTIFY=DELAY ORCPT=rfc822;e+2B1@x") == "250 OK"
        assert wire.cmd("DATA").startswith("354")
        assert wire.cmd(b"hi\r\n.") == "250 OK"
    envelope = handler.envelopes[0]
    assert envelope.mail_from == "a@example.com"
    assert envelope.rcpt_tos == ["c@example.com", "d@example.com", "e@example.com"]
    # Values are checked case-blind here; test_dsn_values_keep_their_case checks the case.
    assert [o.upper() for o in envelope.mail_options] == ["RET=HDRS", "ENVID=ABC+2BDEF"]
    assert [o.upper() for o in envelope.rcpt_options] == [
        "NOTIFY=SUCCESS,FAILURE",
        "ORCPT=RFC822;C@EXAMPLE.COM",
        "NOTIFY=NEVER",
        "NOTIFY=DELAY",
        "ORCPT=RFC822;E+2B1@X",
    ]


def test_dsn_values_keep_their_case(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, dsn=True)
    with Wire(controller) as wire:
        wire.ehlo()
        assert wire.cmd(DSN_MAIL) == "250 OK"
        assert wire.cmd(DSN_RCPT) == "250 OK"
        assert wire.cmd("DATA").startswith("354")
        assert wire.cmd(b"hi\r\n.") == "250 OK"
    envelope = handler.envelopes[0]
    assert "ENVID=abc+2Bdef" in envelope.mail_options
    assert any(
        o.upper().startswith("ORCPT=RFC822;") and o.endswith(";c@example.com")
        for o in envelope.rcpt_options
    )


@pytest.mark.parametrize(
    "mail",
    [
        "MAIL FROM:<a@example.com> RET=BOGUS",
        "MAIL FROM:<a@example.com> RET",
        "MAIL FROM:<a@example.com> ENVID=a+zz",
        "MAIL FROM:<a@example.com> ENVID=" + "x" * 101,
    ],
)
def test_dsn_malformed_mail_parameters_are_501(
    make_controller: Any, handler: Any, mail: str
) -> None:
    controller = make_controller(handler, dsn=True)
    with Wire(controller) as wire:
        wire.ehlo()
        assert wire.cmd(mail) == "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]"
        assert wire.cmd("MAIL FROM:<a@example.com>") == "250 OK"  # nothing was half-accepted


@pytest.mark.parametrize(
    "params",
    [
        "NOTIFY=NEVER,SUCCESS",
        "NOTIFY=SUCCESS,SUCCESS",
        "NOTIFY=SOMETIMES",
        "NOTIFY",
        "ORCPT=c@example.com",
        "ORCPT=;c@example.com",
        "ORCPT=rfc822;",
        "ORCPT",
    ],
)
def test_dsn_malformed_rcpt_parameters_are_501(
    make_controller: Any, handler: Any, params: str
) -> None:
    controller = make_controller(handler, dsn=True)
    with Wire(controller) as wire:
        wire.ehlo()
        start_transaction(wire)
        assert wire.cmd(f"RCPT TO:<c@example.com> {params}") == (
            "501 Syntax: RCPT TO: <address> [SP <mail-parameters>]"
        )


@pytest.mark.parametrize("orcpt", ["utf-8;c@example.com", "x-local;c@example.com"])
def test_dsn_orcpt_addr_type_may_hold_a_hyphen(
    make_controller: Any, handler: Any, orcpt: str
) -> None:
    controller = make_controller(handler, dsn=True)
    with Wire(controller) as wire:
        wire.ehlo()
        start_transaction(wire)
        assert wire.cmd(f"RCPT TO:<c@example.com> ORCPT={orcpt}") == "250 OK"


def test_dsn_parameters_without_dsn_are_555(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler)
    with Wire(controller) as wire:
        assert not any("DSN" in line for line in wire.ehlo())
        assert wire.cmd(DSN_MAIL) == "555 MAIL FROM parameters not recognized or not implemented"
        assert wire.cmd("MAIL FROM:<a@example.com> RET=BOGUS") == (
            "555 MAIL FROM parameters not recognized or not implemented"
        )
        assert wire.cmd("MAIL FROM:<a@example.com>") == "250 OK"
        assert wire.cmd(DSN_RCPT) == "555 RCPT TO parameters not recognized or not implemented"
        assert wire.cmd("RCPT TO:<c@example.com> NOTIFY=SUCCESS") == (
            "555 RCPT TO parameters not recognized or not implemented"
        )


# == CHUNKING / BDAT ==============================================================================

#: Lookalike terminators, a bare LF, a leading dot and a stuffed-looking dot: all plain content.
BODY = (
    b"Subject: chunks\r\n"
    b"\r\n"
    b"line one\r\n"
    b".\r\n"
    b"..two dots stay two\r\n"
    b"bare\nlf and\r\n"
    b".single dot\r\n"
    b"\r\n.\r\n"
    b"last line\r\n"
)


def chunked(content: bytes) -> list[bytes]:
    """``content`` cut inside CRLFs and inside every ``\\r\\n.\\r\\n``, with a 0-size chunk."""
    cuts = {1, 17, len(content) - 1}
    start = 0
    while (at := content.find(b"\r\n.\r\n", start)) >= 0:
        cuts |= {at + 1, at + 3, at + 4}
        start = at + 1
    at = content.find(b"\r\n", 20)
    cuts.add(at + 1)
    bounds = [0, *sorted(cuts), len(content)]
    chunks = [content[a:b] for a, b in itertools.pairwise(bounds)]
    chunks.insert(3, b"")
    assert b"".join(chunks) == content
    assert all(b"\r\n.\r\n" not in chunk for chunk in chunks)
    assert any(chunk.endswith(b"\r") for chunk in chunks)
    return chunks


def test_chunking_advertised_only_when_enabled(make_controller: Any, handler: Any) -> None:
    plain = make_controller(handler)
    with Wire(plain) as wire:
        assert not any("CHUNKING" in line for line in wire.ehlo())
        assert "BDAT" not in wire.cmd("HELP")
        assert wire.cmd("BDAT 0 LAST") == '500 Error: command "BDAT" not recognized'
    chunking = make_controller(handler, chunking=True)
    with Wire(chunking) as wire:
        lines = wire.ehlo()
        assert "250-CHUNKING" in lines and lines[-1] == "250 HELP"
        assert " BDAT " in wire.cmd("HELP")


def test_bdat_many_chunks_is_byte_exact_and_same_envelope_as_data(
    make_controller: Any, handler: Any
) -> None:
    controller = make_controller(handler, chunking=True)
    mail = "MAIL FROM:<a@example.com> BODY=8BITMIME SIZE=200"
    with Wire(controller) as wire:
        wire.ehlo()
        # First by DATA (dot-stuffed on the wire), then by BDAT in many chunks.
        start_transaction(wire, "b@example.com", "c@example.com", mail=mail)
        assert wire.cmd("DATA").startswith("354")
        wire.send(stuffed(BODY))
        assert wire.line() == "250 OK"
        start_transaction(wire, "b@example.com", "c@example.com", mail=mail)
        chunks = chunked(BODY)
        assert len(chunks) >= 10
        for chunk in chunks:
            reply = wire.bdat(chunk)
            assert reply.startswith("250 ") and str(len(chunk)) in reply, reply
        assert wire.bdat(b"", last=True) == "250 OK"
        # And once more with the last octets in the LAST chunk itself.
        start_transaction(wire, "b@example.com", "c@example.com", mail=mail)
        assert wire.bdat(BODY[:5]).startswith("250 ")
        assert wire.bdat(BODY[5:], last=True) == "250 OK"
        assert wire.cmd("QUIT") == "221 Bye"
    by_data, *by_bdat = handler.envelopes
    assert by_data.content == BODY  # DATA unstuffed what stuffed() added
    assert len(by_bdat) == 2
    for envelope in by_bdat:
        assert envelope.content == BODY  # no unstuffing in BDAT: ".." stays ".."
        for field in (
            "mail_from",
            "mail_options",
            "smtp_utf8",
            "rcpt_tos",
            "rcpt_options",
            "content",
            "original_content",
        ):
            assert getattr(envelope, field) == getattr(by_data, field), field
    assert by_data.mail_options == ["BODY=8BITMIME", "SIZE=200"]
    assert by_data.rcpt_tos == ["b@example.com", "c@example.com"]


def test_bdat_with_decode_data_gives_text(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, chunking=True, decode_data=True)
    with Wire(controller) as wire:
        wire.ehlo()
        start_transaction(wire)
        assert wire.bdat("Grüße\r\n".encode()).startswith("250 ")
        assert wire.bdat(b"..x\r\n", last=True) == "250 OK"
    envelope = handler.envelopes[0]
    assert envelope.content == "Grüße\r\n..x\r\n"
    assert envelope.original_content == "Grüße\r\n..x\r\n".encode()


#: 200 octets that would close the session if they were taken for commands.
QUIT_FLOOD = b"QUIT\r\n" * 33 + b"\r\n"


def test_bdat_last_over_the_size_limit(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, chunking=True, data_size_limit=100)
    assert len(QUIT_FLOOD) == 200
    with Wire(controller) as wire:
        wire.ehlo()
        start_transaction(wire)
        assert wire.bdat(QUIT_FLOOD, last=True) == "552 Error: Too much mail data"
        assert wire.cmd("NOOP") == "250 OK"  # the chunk was consumed, not executed
        # The transaction is over: a new MAIL is not nested.
        start_transaction(wire)
        assert wire.bdat(QUIT_FLOOD[:60]).startswith("250 ")
        assert wire.bdat(QUIT_FLOOD[:60], last=True) == "552 Error: Too much mail data"
        assert wire.cmd("NOOP") == "250 OK"
        # A non-LAST chunk that crosses the limit is refused too, and consumed.
        start_transaction(wire)
        assert wire.bdat(QUIT_FLOOD[:150]) == "552 Error: Too much mail data"
        assert wire.cmd("NOOP") == "250 OK"
        assert handler.envelopes == []
        # Exactly at the limit is fine.
        start_transaction(wire)
        assert wire.bdat(b"a" * 40).startswith("250 ")
        assert wire.bdat(b"b" * 60, last=True) == "250 OK"
        assert wire.cmd("QUIT") == "221 Bye"
        wire.assert_closed()
    assert [e.content for e in handler.envelopes] == [b"a" * 40 + b"b" * 60]


SMUGGLED = b"MAIL FROM:<smuggled@example.com>\r\n"


def test_refused_bdat_chunk_is_consumed_never_executed(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, chunking=True, pipelining=True)
    with Wire(controller) as wire:
        # Before EHLO.
        assert wire.bdat(SMUGGLED, last=True) == "503 Error: send HELO first"
        assert wire.cmd("VRFY <z@example.com>").startswith("252 ")  # the very next reply
        wire.ehlo()
        # Before MAIL and before RCPT.
        assert wire.bdat(SMUGGLED, last=True) == "503 Error: need RCPT command"
        assert wire.cmd("VRFY <z@example.com>").startswith("252 ")
        assert wire.cmd("MAIL FROM:<real@example.com>") == "250 OK"  # not "nested"
        assert wire.bdat(SMUGGLED) == "503 Error: need RCPT command"
        assert wire.cmd("VRFY <z@example.com>").startswith("252 ")
        assert wire.cmd("RCPT TO:<b@example.com>") == "250 OK"
        assert wire.bdat(b"body\r\n", last=True) == "250 OK"
    assert len(handler.envelopes) == 1
    assert handler.envelopes[0].mail_from == "real@example.com"
    assert handler.envelopes[0].content == b"body\r\n"


@pytest.mark.parametrize("arg", ["abc", "", "-1", "5 NOTLAST", "5 LAST extra", "0x10", "5LAST"])
def test_bdat_bad_size_is_501_and_closes(make_controller: Any, handler: Any, arg: str) -> None:
    controller = make_controller(handler, chunking=True)
    with Wire(controller) as wire:
        wire.ehlo()
        start_transaction(wire)
        assert wire.cmd(f"BDAT {arg}".rstrip()) == "501 Syntax: BDAT <size> [LAST]"
        wire.assert_closed()
    assert handler.envelopes == []


@pytest.mark.parametrize("size", ["\u00b3", "\u0663"])
def test_bdat_size_must_be_ascii_digits(
    make_controller: Any, handler: Any, caplog: pytest.LogCaptureFixture, size: str
) -> None:
    controller = make_controller(handler, chunking=True)  # the Controller enables SMTPUTF8
    with Wire(controller) as wire:
        wire.ehlo()
        start_transaction(wire)
        wire.send(f"BDAT {size} LAST\r\n".encode() + b"abc")
        assert wire.line() == "501 Syntax: BDAT <size> [LAST]"
        wire.assert_closed()
    assert handler.envelopes == []
    assert not errors_logged(caplog)


def test_data_after_bdat_is_refused(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, chunking=True)
    with Wire(controller) as wire:
        wire.ehlo()
        start_transaction(wire)
        assert wire.bdat(b"abc").startswith("250 ")
        reply = wire.cmd("DATA")
        assert reply.startswith("503 "), reply
        # The BDAT transaction is intact and can finish.
        assert wire.bdat(b"def\r\n", last=True) == "250 OK"
    assert [e.content for e in handler.envelopes] == [b"abcdef\r\n"]


def test_bdat_then_rset_then_data(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, chunking=True)
    with Wire(controller) as wire:
        wire.ehlo()
        start_transaction(wire)
        assert wire.bdat(b"discarded ").startswith("250 ")
        assert wire.cmd("RSET") == "250 OK"
        start_transaction(wire, mail="MAIL FROM:<again@example.com>")
        assert wire.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        assert wire.cmd(b"by data\r\n.") == "250 OK"
        # And BDAT after a finished BDAT transaction starts afresh.
        start_transaction(wire)
        assert wire.bdat(b"x\r\n", last=True) == "250 OK"
    assert [(e.mail_from, e.content) for e in handler.envelopes] == [
        ("again@example.com", b"by data\r\n"),
        ("a@example.com", b"x\r\n"),
    ]


def test_pipelined_bdat_chunks_in_one_write(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, chunking=True, pipelining=True)
    with Wire(controller) as wire:
        lines = wire.ehlo()
        assert "250-PIPELINING" in lines and "250-CHUNKING" in lines
        wire.send(
            b"MAIL FROM:<a@example.com>\r\n"
            b"RCPT TO:<b@example.com>\r\n"
            b"BDAT 7\r\nhello, "
            b"BDAT 0\r\n"
            b"BDAT 8 LAST\r\nworld\r\n."
            b"MAIL FROM:<c@example.com>\r\n"
            b"RCPT TO:<d@example.com>\r\n"
            b"BDAT 15 LAST\r\nRSET\r\nQUIT\r\n.\r\n"
            b"NOOP\r\n"
        )
        replies = [wire.line() for _ in range(9)]
        assert replies[0:2] == ["250 OK", "250 OK"]
        assert replies[2].startswith("250 ") and "7" in replies[2]
        assert replies[3].startswith("250 ")
        assert replies[4:] == ["250 OK", "250 OK", "250 OK", "250 OK", "250 OK"]
        assert wire.cmd("QUIT") == "221 Bye"
        wire.assert_closed()
    assert [(e.mail_from, e.content) for e in handler.envelopes] == [
        ("a@example.com", b"hello, world\r\n."),
        ("c@example.com", b"RSET\r\nQUIT\r\n.\r\n"),
    ]


def test_smuggling_payload_in_a_bdat_chunk_is_one_message(
    make_controller: Any, handler: Any
) -> None:
    controller = make_controller(handler, chunking=True, pipelining=True)
    payload = (
        b"Subject: innocent\r\n\r\nhello\r\n"
        b"\n.\r\n"  # <LF>.<CRLF>
        b"\r\n.\r\n"  # a real DATA terminator, inside a chunk
        b"MAIL FROM:<evil@example.com>\r\n"
        b"RCPT TO:<victim@example.com>\r\n"
        b"DATA\r\n"
        b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
        b"BDAT 4 LAST\r\nevil"
    )
    with Wire(controller) as wire:
        wire.ehlo()
        start_transaction(wire)
        assert wire.bdat(payload[:40]).startswith("250 ")
        assert wire.bdat(payload[40:], last=True) == "250 OK"
        assert wire.cmd("NOOP") == "250 OK"  # nothing else was queued
        assert wire.cmd("QUIT") == "221 Bye"
        wire.assert_closed()
    assert len(handler.envelopes) == 1
    assert handler.envelopes[0].content == payload
    assert handler.envelopes[0].rcpt_tos == ["b@example.com"]


def test_enhanced_codes_on_bdat_replies(make_controller: Any, handler: Any) -> None:
    controller = make_controller(
        handler, chunking=True, enhanced_status_codes=True, data_size_limit=10
    )
    with Wire(controller) as wire:
        wire.ehlo()
        assert wire.bdat(b"abc") == "503 5.5.1 Error: need RCPT command"
        start_transaction(wire)
        reply = wire.bdat(b"abc")
        assert enhanced_ok(reply) and reply.startswith("250 2."), reply
        assert wire.bdat(b"x" * 20, last=True) == "552 5.3.4 Error: Too much mail data"
        start_transaction(wire)
        assert wire.bdat(b"abc", last=True) == "250 2.6.0 OK"


# == LMTP ==========================================================================================


def lmtp_controller(make_controller: Any, handler: Any, **kwargs: Any) -> Any:
    """A started Controller whose connections (after the readiness probe) speak LMTP."""
    controller = make_controller(handler, **kwargs)
    controller.factory = lambda: LMTP(handler, **controller.SMTP_kwargs)  # type: ignore[method-assign]
    return controller


class LMTPHandler:
    """Refuses ``reject@...`` at RCPT; answers DATA with ``result`` (any of the three forms)."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.envelopes: list[Any] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("reject"):
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> Any:
        self.envelopes.append(envelope)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_lmtp_lhlo_and_refused_verbs(make_controller: Any, handler: Any) -> None:
    controller = lmtp_controller(make_controller, handler, enable_SMTPUTF8=False)
    with Wire(controller) as wire:
        assert wire.greeting.startswith(f"220 {HOST} ")
        assert wire.cmd("MAIL FROM:<a@example.com>") == "503 Error: send LHLO first"
        assert wire.cmd("HELO client.example") == '500 Error: command "HELO" not recognized'
        assert wire.cmd("EHLO client.example") == '500 Error: command "EHLO" not recognized'
        assert wire.cmd("MAIL FROM:<a@example.com>") == "503 Error: send LHLO first"
        assert wire.cmd("LHLO") == "501 Syntax: LHLO hostname"
        assert wire.ehlo("LHLO") == [f"250-{HOST}", "250-SIZE 33554432", "250-8BITMIME", "250 HELP"]
        assert wire.cmd("MAIL FROM:<a@example.com>") == "250 OK"
    with smtplib.LMTP(controller.hostname, controller.port, timeout=TIMEOUT) as client:
        code, _ = client.ehlo("client.example")  # smtplib's LMTP sends LHLO here
        assert code == 250
    assert handler.sessions == []


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        pytest.param("250 2.0.0 Delivered", ["250 2.0.0 Delivered"] * 2, id="one-string"),
        pytest.param(
            ["250 2.0.0 Delivered to b", "452 4.2.2 Mailbox full"],
            ["250 2.0.0 Delivered to b", "452 4.2.2 Mailbox full"],
            id="list",
        ),
        pytest.param(
            {"d@example.com": "452 4.2.2 Mailbox full", "b@example.com": "250 2.0.0 Ok b"},
            ["250 2.0.0 Ok b", "452 4.2.2 Mailbox full"],
            id="dict",
        ),
        pytest.param(
            {"b@example.com": "250 2.0.0 Ok b"}, ["250 2.0.0 Ok b", LOCAL_ERROR], id="dict-missing"
        ),
        pytest.param(["250 2.0.0 Ok b"], ["250 2.0.0 Ok b", LOCAL_ERROR], id="list-short"),
        pytest.param(42, [LOCAL_ERROR] * 2, id="not-a-reply"),
        pytest.param(None, [LOCAL_ERROR] * 2, id="none"),
        pytest.param(HandlerBoom("boom"), [LOCAL_ERROR] * 2, id="raises"),
    ],
)
def test_lmtp_one_reply_per_accepted_recipient(
    make_controller: Any, result: Any, expected: list[str]
) -> None:
    handler = LMTPHandler(result)
    controller = lmtp_controller(make_controller, handler, pipelining=True)
    with Wire(controller) as wire:
        wire.ehlo("LHLO")
        assert wire.cmd("MAIL FROM:<a@example.com>") == "250 OK"
        assert wire.cmd("RCPT TO:<b@example.com>") == "250 OK"
        assert wire.cmd("RCPT TO:<reject@example.com>") == "550 5.1.1 No such user here"
        assert wire.cmd("RCPT TO:<d@example.com>") == "250 OK"
        assert wire.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
        wire.send(b"Subject: lmtp\r\n\r\nhi\r\n.\r\nNOOP\r\n")
        assert [wire.line() for _ in range(2)] == expected
        assert wire.line() == "250 OK"  # the NOOP: exactly two replies came before it
        assert wire.cmd("QUIT") == "221 Bye"
        wire.assert_closed()
    assert len(handler.envelopes) == 1
    assert handler.envelopes[0].rcpt_tos == ["b@example.com", "d@example.com"]


@pytest.mark.parametrize(
    ("body", "error", "limit"),
    [
        (b"x" * 1001 + b"\r\n", "500 Line too long (see RFC5321 4.5.3.1.6)", 10000),
        (b"y" * 300 + b"\r\n", "552 Error: Too much mail data", 200),
    ],
)
def test_lmtp_data_error_is_one_reply_per_recipient(
    make_controller: Any, handler: Any, body: bytes, error: str, limit: int
) -> None:
    controller = lmtp_controller(make_controller, handler, data_size_limit=limit)
    with Wire(controller) as wire:
        wire.ehlo("LHLO")
        start_transaction(wire, "b@example.com", "c@example.com", "d@example.com")
        assert wire.cmd("DATA").startswith("354")
        wire.send(body + b".\r\nNOOP\r\n")
        assert [wire.line() for _ in range(3)] == [error] * 3
        assert wire.line() == "250 OK"  # in sync
        # The session goes on.
        start_transaction(wire)
        assert wire.cmd("DATA").startswith("354")
        assert wire.cmd(b"ok\r\n.") == "250 OK"
    assert [e.rcpt_tos for e in handler.envelopes] == [["b@example.com"]]


def test_lmtp_bdat_last_gives_one_reply_per_recipient(make_controller: Any) -> None:
    handler = LMTPHandler(["250 2.0.0 Ok b", "450 4.2.0 Try d later"])
    controller = lmtp_controller(
        make_controller, handler, chunking=True, enhanced_status_codes=True
    )
    with Wire(controller) as wire:
        assert "250-CHUNKING" in wire.ehlo("LHLO")
        start_transaction(wire, "b@example.com", "d@example.com")
        assert wire.bdat(b"part one, ").startswith("250 2.")
        wire.send(b"BDAT 9 LAST\r\npart two\nNOOP\r\n")
        assert [wire.line() for _ in range(2)] == ["250 2.0.0 Ok b", "450 4.2.0 Try d later"]
        assert wire.line() == "250 2.0.0 OK"
    assert handler.envelopes[0].content == b"part one, part two\n"


def test_lmtp_non_last_bdat_over_the_limit_is_one_reply(make_controller: Any) -> None:
    handler = LMTPHandler("250 OK")
    controller = lmtp_controller(make_controller, handler, chunking=True, data_size_limit=10)
    with Wire(controller) as wire:
        wire.ehlo("LHLO")
        start_transaction(wire, "b@example.com", "d@example.com")
        wire.send(b"BDAT 20\r\n" + b"x" * 20 + b"NOOP\r\n")
        assert wire.line() == "552 Error: Too much mail data"
        assert wire.line() == "250 OK"  # the NOOP's
    assert handler.envelopes == []


def test_lmtp_enhanced_codes_per_recipient(make_controller: Any) -> None:
    handler = LMTPHandler(["250 Delivered", "452 Mailbox full"])
    controller = lmtp_controller(make_controller, handler, enhanced_status_codes=True)
    with Wire(controller) as wire:
        wire.ehlo("LHLO")
        assert wire.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 OK"
        assert wire.cmd("RCPT TO:<b@example.com>") == "250 2.1.5 OK"
        assert wire.cmd("RCPT TO:<d@example.com>") == "250 2.1.5 OK"
        assert wire.cmd("DATA").startswith("354 ")
        wire.send(b"hi\r\n.\r\n")
        first, second = wire.line(), wire.line()
        assert first == "250 2.6.0 Delivered"
        assert (
            enhanced_ok(second) and second.startswith("452 4.") and second.endswith(" Mailbox full")
        )
