"""aiosmtpd compatibility: replies, hooks, Session/Envelope, over real sockets with smtplib."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import threading
from typing import Any

import pytest

from farm import smtp as farm_smtp
from farm.smtp import SMTP, syntax
from tests.support.client import SMTPClient
from tests.support.loops import both_loops  # noqa: F401  (loop_kind: asyncio and uvloop)


def client_for(controller: Any) -> smtplib.SMTP:
    return smtplib.SMTP(controller.hostname, controller.port, timeout=10)


def test_import_surface() -> None:
    for name in (
        "SMTP",
        "Session",
        "Envelope",
        "AuthResult",
        "LoginPassword",
        "auth_mechanism",
        "MISSING",
    ):
        assert hasattr(farm_smtp, name), name
    assert farm_smtp.BOGUS_LIMIT == 5
    assert farm_smtp.CALL_LIMIT_DEFAULT == 20
    assert farm_smtp.DATA_SIZE_DEFAULT == 33554432


def test_greeting_and_ehlo_exact(controller: Any) -> None:
    with smtplib.SMTP(timeout=10) as client:
        code, greeting = client.connect(controller.hostname, controller.port)
        assert code == 220
        assert greeting.startswith(b"farm.test Python SMTP")
        code, banner = client.ehlo("me")
        assert code == 250
        assert banner.decode().splitlines() == ["farm.test", "SIZE 33554432", "8BITMIME", "HELP"]


def test_ehlo_keywords_follow_options(make_controller: Any, handler: Any) -> None:
    controller = make_controller(
        handler, data_size_limit=None, decode_data=True, pipelining=True, auth_require_tls=False
    )
    with client_for(controller) as client:
        _, banner = client.ehlo("me")
    assert banner.decode().splitlines() == [
        "farm.test",
        "SMTPUTF8",
        "PIPELINING",
        "AUTH LOGIN PLAIN",
        "HELP",
    ]


def test_helo_and_basic_transaction(controller: Any, handler: Any) -> None:
    with client_for(controller) as client:
        assert client.helo("client.example") == (250, b"farm.test")
        client.sendmail("a@example.com", ["b@example.com", "c@example.com"], b"Hi\r\n.dot\r\n")
    envelope = handler.envelopes[0]
    assert envelope.mail_from == "a@example.com"
    assert envelope.rcpt_tos == ["b@example.com", "c@example.com"]
    assert envelope.content == b"Hi\r\n.dot\r\n"
    assert envelope.original_content == envelope.content
    session = handler.sessions[0]
    assert session.host_name == "client.example"
    assert session.extended_smtp is False
    assert session.peer[0] == "127.0.0.1"


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (["FOO"], (500, b'Error: command "FOO" not recognized')),
        (["HELO"], (501, b"Syntax: HELO hostname")),
        (["EHLO"], (501, b"Syntax: EHLO hostname")),
        (["MAIL FROM:<a@b>"], (503, b"Error: send HELO first")),
        (["RCPT TO:<a@b>"], (503, b"Error: send HELO first")),
        (["EHLO x", "MAIL"], (501, b"Syntax: MAIL FROM: <address> [SP <mail-parameters>]")),
        (["HELO x", "MAIL"], (501, b"Syntax: MAIL FROM: <address>")),
        (["HELO x", "MAIL FROM:<a@b> SIZE=10"], (501, b"Syntax: MAIL FROM: <address>")),
        (
            ["EHLO x", "MAIL FROM:<a@b>", "RCPT"],
            (501, b"Syntax: RCPT TO: <address> [SP <mail-parameters>]"),
        ),
        (["HELO x", "MAIL FROM:<a@b>", "RCPT TO"], (501, b"Syntax: RCPT TO: <address>")),
        (["HELO x", "MAIL FROM:<@>"], (553, b"5.1.3 Error: malformed address")),
        (["HELO x", 'MAIL FROM:"'], (553, b"5.1.3 Error: malformed address")),
        (["HELO x", "MAIL FROM:<a@b>", 'RCPT TO:"'], (553, b"5.1.3 Error: malformed address")),
        (["HELO x", "MAIL FROM:<a@b>", "MAIL FROM:<c@d>"], (503, b"Error: nested MAIL command")),
        (["HELO x", "RCPT TO:<a@b>"], (503, b"Error: need MAIL command")),
        (["HELO x", "DATA"], (503, b"Error: need RCPT command")),
        (["HELO x", "MAIL FROM:<a@b>", "RCPT TO:<c@d>", "DATA x"], (501, b"Syntax: DATA")),
        (
            ["EHLO x", "MAIL FROM:<a@b> SIZE=33554433"],
            (552, b"Error: message size exceeds fixed maximum message size"),
        ),
        (
            ["EHLO x", "MAIL FROM:<a@b> FOO=BAR"],
            (555, b"MAIL FROM parameters not recognized or not implemented"),
        ),
        (
            ["EHLO x", "MAIL FROM:<a@b>", "RCPT TO:<c@d> FOO=BAR"],
            (555, b"RCPT TO parameters not recognized or not implemented"),
        ),
        (
            ["EHLO x", "MAIL FROM:<a@b> BODY=9BIT"],
            (501, b"Error: BODY can only be one of 7BIT, 8BITMIME"),
        ),
        (["EHLO x", "MAIL FROM:<a@b> SMTPUTF8"], (501, b"Error: SMTPUTF8 disabled")),
        (["RSET x"], (501, b"Syntax: RSET")),
        (["NOOP x"], (250, b"OK")),
        (["QUIT x"], (501, b"Syntax: QUIT")),
        (["VRFY"], (501, b"Syntax: VRFY <address>")),
        (["VRFY <a@b>"], (252, b"Cannot VRFY user, but will accept message and attempt delivery")),
        (["EXPN a"], (502, b"EXPN not implemented")),
        (["STARTTLS"], (454, b"TLS not available")),
        (
            ["EHLO x", "AUTH PLAIN"],
            (538, b"5.7.11 Encryption required for requested authentication mechanism"),
        ),
        (
            ["HELP"],
            (250, b"Supported commands: AUTH DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"),
        ),
        (["HELP MAIL"], (250, b"Syntax: MAIL FROM: <address>")),
        (
            ["HELP FOO"],
            (501, b"Supported commands: AUTH DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET VRFY"),
        ),
    ],
)
def test_reply_texts(controller: Any, commands: list[str], expected: tuple[int, bytes]) -> None:
    with client_for(controller) as client:
        reply = None
        for command in commands:
            reply = client.docmd(command)
        assert reply == expected


def test_empty_line_and_non_ascii(controller: Any) -> None:
    with SMTPClient.of(controller, timeout=10, greeting=True) as client:
        assert client.command("") == "500 Error: bad syntax\r\n"
        assert client.command("NÖÖP") == "500 Error: bad syntax\r\n"
        assert client.command("HELO hé") == "500 Error: strict ASCII mode\r\n"
        assert client.command("NOOP") == "250 OK\r\n"


def test_null_sender_and_smtputf8(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler)  # Controller default: enable_SMTPUTF8=True
    with client_for(controller) as client:
        client.ehlo("me")
        assert client.has_extn("smtputf8")
        assert client.docmd("MAIL FROM:<> SMTPUTF8") == (250, b"OK")
        client.send("RCPT TO:<jürgen@exämple.de>\r\n".encode())
        assert client.getreply() == (250, b"OK")
        assert client.docmd("DATA")[0] == 354
        client.send("Grüße\r\n.\r\n".encode())
        assert client.getreply() == (250, b"OK")
    envelope = handler.envelopes[0]
    assert envelope.mail_from == "<>"
    assert envelope.smtp_utf8 is True
    assert envelope.rcpt_tos == ["jürgen@exämple.de"]
    assert envelope.content == "Grüße\r\n".encode()


@pytest.mark.parametrize("switch", [1, None])
def test_smtputf8_switch_taken_for_its_truth(
    make_controller: Any, handler: Any, switch: Any
) -> None:
    """aiosmtpd takes any truthy or falsy ``enable_SMTPUTF8``; so do the compiled parsers."""
    controller = make_controller(handler, enable_SMTPUTF8=switch)
    with SMTPClient.of(controller, timeout=10, greeting=True) as client:
        assert client.command("EHLO me").startswith("250-")
        expected = "250 OK\r\n" if switch else "500 Error: strict ASCII mode\r\n"
        assert client.command("MAIL FROM:<jö@b>") == expected
        assert client.command("NOOP") == "250 OK\r\n"


def test_decode_data_gives_str(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, decode_data=True, enable_SMTPUTF8=False)
    with client_for(controller) as client:
        client.sendmail("a@b.c", ["d@e.f"], b"plain ascii\r\n")
    envelope = handler.envelopes[0]
    assert envelope.content == "plain ascii\r\n"
    assert envelope.original_content == b"plain ascii\r\n"


def test_size_limit_none_drops_size_keyword(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, data_size_limit=0, enable_SMTPUTF8=False)
    with client_for(controller) as client:
        _, banner = client.ehlo("me")
        assert b"SIZE" not in banner
        client.sendmail("a@b.c", ["d@e.f"], (b"x" * 998 + b"\r\n") * 100)
    assert len(handler.envelopes[0].content) == 100_000


class HookHandler:
    """Implements every hook, recording its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        session.host_name = hostname
        self.calls.append(("HELO", hostname))
        return "250 custom helo"

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.calls.append(("EHLO", list(responses)))
        return [*responses[:-1], "250-X-CUSTOM", responses[-1]]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        self.calls.append(("MAIL", (address, options)))
        return "250 sender ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("bad"):
            return "550 no such user"
        envelope.rcpt_tos.append(address)
        return "250 rcpt ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.calls.append(("DATA", (envelope.mail_from, tuple(envelope.rcpt_tos))))
        return "250 queued as X1"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 reset done"

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        return f"250 noop {arg}"

    async def handle_VRFY(self, server: Any, session: Any, envelope: Any, address: str) -> str:
        return f"250 <{address}>"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        return "221 see you"


def test_every_hook_is_called(make_controller: Any) -> None:
    hooks = HookHandler()
    controller = make_controller(hooks, enable_SMTPUTF8=False)
    with client_for(controller) as client:
        assert client.helo("h") == (250, b"custom helo")
        code, banner = client.ehlo("e")
        assert code == 250
        assert banner.decode().splitlines()[-2:] == ["X-CUSTOM", "HELP"]
        assert client.docmd("NOOP hi") == (250, b"noop hi")
        assert client.docmd("VRFY <a@b>") == (250, b"<a@b>")
        assert client.docmd("MAIL FROM:<a@b> BODY=8BITMIME") == (250, b"sender ok")
        assert client.docmd("RCPT TO:<bad@b>") == (550, b"no such user")
        assert client.docmd("RCPT TO:<good@b>") == (250, b"rcpt ok")
        assert client.docmd("DATA")[0] == 354
        client.send(b"body\r\n.\r\n")
        assert client.getreply() == (250, b"queued as X1")
        assert client.docmd("RSET") == (250, b"reset done")
        assert client.docmd("QUIT") == (221, b"see you")
    assert ("MAIL", ("a@b", ["BODY=8BITMIME"])) in hooks.calls
    assert ("DATA", ("a@b", ("good@b",))) in hooks.calls
    ehlo_responses = next(arg for name, arg in hooks.calls if name == "EHLO")
    assert ehlo_responses == ["250-farm.test", "250-SIZE 33554432", "250-8BITMIME", "250 HELP"]


def test_old_style_ehlo_hook(make_controller: Any) -> None:
    class OldStyle:
        async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
            session.host_name = hostname
            return "250 HELP"

    controller = make_controller(OldStyle(), enable_SMTPUTF8=False)
    with client_for(controller) as client:
        _, banner = client.ehlo("me")
        assert banner.decode().splitlines() == ["farm.test", "SIZE 33554432", "8BITMIME", "HELP"]


def test_hook_exception_uses_handle_exception(make_controller: Any) -> None:
    class Broken:
        def __init__(self) -> None:
            self.errors: list[Exception] = []

        async def handle_MAIL(self, *args: Any) -> str:
            raise ValueError("boom")

        async def handle_exception(self, error: Exception) -> str:
            self.errors.append(error)
            return "450 try later"

    broken = Broken()
    controller = make_controller(broken)
    with client_for(controller) as client:
        client.ehlo("me")
        assert client.docmd("MAIL FROM:<a@b>") == (450, b"try later")
        assert client.noop() == (250, b"OK")
    assert isinstance(broken.errors[0], ValueError)


def test_handle_exception_returning_none_is_4xx(make_controller: Any) -> None:
    class Broken:
        async def handle_DATA(self, *args: Any) -> str:
            raise RuntimeError("boom")

        async def handle_exception(self, error: Exception) -> None:
            return None

    controller = make_controller(Broken())
    with client_for(controller) as client:
        with pytest.raises(smtplib.SMTPDataError) as caught:
            client.sendmail("a@b", ["c@d"], b"x\r\n")
        assert caught.value.smtp_code == 451
        assert client.rset() == (250, b"OK")


def test_command_call_limit(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, command_call_limit={"NOOP": 3})
    with client_for(controller) as client:
        for _ in range(3):
            assert client.noop() == (250, b"OK")
        assert client.noop() == (421, b"4.7.0 NOOP sent too many times")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()


def test_subclass_can_add_a_command(make_controller: Any, handler: Any) -> None:
    class WithXHELLO(SMTP):
        @syntax("XHELLO [name]")
        async def smtp_XHELLO(self, arg: str | None) -> None:
            await self.push(f"250 hello {arg}")

    controller = make_controller(handler)
    controller.factory = lambda: WithXHELLO(handler, hostname="farm.test")  # type: ignore[method-assign]
    with client_for(controller) as client:
        assert client.docmd("XHELLO you") == (250, b"hello you")
        assert client.docmd("HELP XHELLO") == (250, b"Syntax: XHELLO [name]")


def test_multiline_handler_reply_is_well_formed(make_controller: Any) -> None:
    class Chatty:
        async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
            return "250 first line\nsecond line\r\nthird line"

    controller = make_controller(Chatty())
    with SMTPClient.of(controller, timeout=10, greeting=True) as client:
        client.send(b"NOOP\r\nQUIT\r\n")
        assert [client.reply(), client.reply()] == [
            "250-first line\r\n250-second line\r\n250 third line\r\n",
            "221 Bye\r\n",
        ]


def test_hung_hook_is_given_up_after_timeout(make_controller: Any) -> None:
    class Hung:
        def __init__(self) -> None:
            self.cancelled = threading.Event()

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return "250 never"

    hung = Hung()
    controller = make_controller(hung, timeout=1)
    with socket.create_connection((controller.hostname, controller.port), timeout=30) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"HELO me\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n")
        replies = [reader.readline() for _ in range(5)]
        assert replies[-1] == b"451 4.3.0 Requested action aborted: local error\r\n"
        assert reader.readline() == b""  # closed
    assert hung.cancelled.wait(10)
