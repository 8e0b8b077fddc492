"""``SMTP.protocol_factory``: the configuration is worked out once, each connection's state is
its own (real sockets, smtplib clients talking to sessions built by one factory)."""

from __future__ import annotations

import smtplib
from typing import Any

from farm.smtp import SMTP
from tests.support.serving import serve_blocking
from tests.support.wait import WAIT


class Recorder:
    """Keeps the envelope of every message (sender, recipients, content)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str | None, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


def test_interleaved_sessions_of_one_factory_keep_their_own_state() -> None:
    """Two open sessions, commands interleaved: envelopes, unknown-command allowances and error
    counts are per connection (a state shared through the factory would mix them)."""
    handler = Recorder()
    factory = SMTP.protocol_factory(
        handler, hostname="farm.test", unknown_command_limit=2, hard_error_limit=3
    )

    def clients(port: int) -> list[tuple[int, bytes]]:
        replies = []
        a = smtplib.SMTP("127.0.0.1", port, timeout=WAIT)
        b = smtplib.SMTP("127.0.0.1", port, timeout=WAIT)
        for client in (a, b):
            client.ehlo("client.test")
        replies.append(a.docmd("FOO"))  # each session may send one unknown command
        replies.append(b.docmd("FOO"))
        replies.append(a.docmd("RCPT TO:<x@farm.test>"))  # an error each: 2 of 3 allowed
        replies.append(b.docmd("RCPT TO:<x@farm.test>"))
        a.mail("a@client.test")
        b.mail("b@client.test")
        a.rcpt("to-a@farm.test")
        b.rcpt("to-b@farm.test")
        b.data(b"Subject: b\r\n\r\nfrom b\r\n")
        a.data(b"Subject: a\r\n\r\nfrom a\r\n")
        replies.append(a.noop())
        replies.append(b.noop())
        a.quit()
        b.quit()
        return replies

    (replies,) = serve_blocking(factory, clients)
    assert [code for code, _ in replies] == [500, 500, 503, 503, 250, 250], replies
    assert handler.messages == [
        ("b@client.test", ["to-b@farm.test"], b"Subject: b\r\n\r\nfrom b\r\n"),
        ("a@client.test", ["to-a@farm.test"], b"Subject: a\r\n\r\nfrom a\r\n"),
    ]


def test_a_subclass_with_its_own_init_is_constructed_per_connection() -> None:
    built: list[SMTP] = []

    class Counting(SMTP):
        def __init__(self, handler: Any, **kwargs: Any) -> None:
            super().__init__(handler, **kwargs)
            self.greeting_name = f"session-{len(built)}"
            built.append(self)

    factory = Counting.protocol_factory(Recorder(), hostname="farm.test")
    built.clear()  # the factory's own prototype

    def clients(port: int) -> list[int]:
        codes = []
        for _ in range(2):
            with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
                codes.append(client.noop()[0])
        return codes

    assert serve_blocking(factory, clients) == [[250, 250]]
    assert [protocol.greeting_name for protocol in built] == ["session-0", "session-1"]


def test_the_factory_checks_its_arguments_at_once() -> None:
    """A bad argument fails when the factory is made, as the constructor would."""
    try:
        SMTP.protocol_factory(Recorder(), proxy_protocol_timeout=-1)
    except ValueError as error:
        assert "proxy_protocol_timeout" in str(error)
    else:
        raise AssertionError("no ValueError")
