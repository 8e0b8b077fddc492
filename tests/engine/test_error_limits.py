"""Postfix-style error limits (issue 12 items 1 and 2): a soft limit past which replies are
delayed (without blocking the event loop), a hard limit that ends the session with
``421 4.7.0 <host> Error: too many errors``, junk commands that count once past their own limit,
refused recipients counted as errors (a directory harvest ends after 20 guesses), errors forgiven
by an accepted message. Off for a plain ``SMTP``/``Controller`` (aiosmtpd's behaviour), on in the
farm's ``[smtp]`` defaults.

Real Controllers and a real ``farm serve`` on loopback, raw sockets; Postfix's ``smtp-sink`` as
the next hop. Timing assertions are lower bounds (a delay at least this long) or orderings.
"""

from __future__ import annotations

import select
import smtplib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from farm.config import SMTPSettings
from tests.support.client import SMTPClient, codes
from tests.support.farms import FarmRunner, toml_config
from tests.support.loops import both_loops  # noqa: F401  (loop_kind: asyncio and uvloop)
from tests.support.relay import DOMAIN, HAVE_SINK, make_relay

TOO_MANY = "421 4.7.0 farm.test Error: too many errors"
BAD = b"RCPT TO:<x@y>\r\n"  # before MAIL: 503


def test_off_by_default(make_controller: Any, handler: Any) -> None:
    with SMTPClient.of(make_controller(handler)) as client:
        client.send(b"EHLO me\r\n" + BAD * 200 + b"NOOP\r\n" * 200 + b"QUIT\r\n")
        replies = client.replies_until_close()
    assert codes(replies) == [220, 250] + [503] * 200 + [250] * 200 + [221]


def test_hard_limit_closes_after_the_nth_error(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, hard_error_limit=5)
    with SMTPClient.of(controller) as client:
        client.send(b"EHLO me\r\n" + BAD * 3000)  # pipelined: nothing after the 5th is answered
        replies = client.replies_until_close()
    assert codes(replies) == [220, 250, 503, 503, 503, 503, 503, 421]
    assert replies[-1].text == TOO_MANY


def test_each_kind_of_error_counts(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, hard_error_limit=6)
    with SMTPClient.of(controller) as client:
        client.reply()
        assert client.command(b"MAIL FROM:<a@b>").code == 503  # before HELO
        assert client.command(b"EHLO me").code == 250
        assert client.command(b"MAIL TO:<a@b>").code == 501
        assert client.command(b"BOGUS").code == 500
        assert client.command(b"MAIL FROM:<a@b> SIZE=99999999999").code == 552
        assert client.command(b"A" * 600).code == 500  # a command line too long
        assert client.command(b"RCPT TO:<x@y>").code == 503  # the 6th error is answered...
        (last,) = client.replies_until_close()  # ...and followed by the 421
    assert last.text == TOO_MANY


def test_refused_recipients_count(make_controller: Any) -> None:
    class Picky:
        async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, _):
            if address.startswith("ok"):
                envelope.rcpt_tos.append(address)
                return "250 OK"
            return "550 5.1.1 unknown user"

    controller = make_controller(Picky(), hard_error_limit=4)
    with SMTPClient.of(controller) as client:
        stream = b"EHLO me\r\nMAIL FROM:<a@b>\r\nRCPT TO:<ok@x>\r\n"
        stream += b"".join(b"RCPT TO:<guess%d@x>\r\n" % i for i in range(1000))
        client.send(stream)
        replies = client.replies_until_close()
    assert codes(replies) == [220, 250, 250, 250, 550, 550, 550, 550, 421]


def test_junk_commands_count_past_their_limit(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, junk_command_limit=4, hard_error_limit=3)
    with SMTPClient.of(controller) as client:
        client.send(b"NOOP\r\nHELO a\r\nEHLO b\r\nRSET\r\nVRFY <c@d>\r\nHELP\r\nNOOP\r\nNOOP\r\n")
        replies = client.replies_until_close()
    # 4 free, then each one an error: the 3rd error (7th junk) gets no answer of its own.
    assert codes(replies) == [220, 250, 250, 250, 250, 252, 250, 421]
    assert replies[-1].text == TOO_MANY


def test_452_is_flow_control_not_an_error(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, max_recipients=1, hard_error_limit=2)
    with SMTPClient.of(controller) as client:
        client.send(b"EHLO me\r\nMAIL FROM:<a@b>\r\n" + b"RCPT TO:<r@x>\r\n" * 50 + b"QUIT\r\n")
        replies = client.replies_until_close()
    assert codes(replies) == [220, 250, 250, 250] + [452] * 49 + [221]


def test_an_accepted_message_forgives(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, hard_error_limit=3)
    message = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"
    with SMTPClient.of(controller) as client:
        client.send(b"EHLO me\r\n" + BAD * 2 + message + BAD * 2 + message + b"QUIT\r\n")
        replies = client.replies_until_close()
    assert codes(replies) == [220, 250, 503, 503, 250, 250, 354, 250] * 1 + [
        503,
        503,
        250,
        250,
        354,
        250,
        221,
    ]
    assert len(handler.envelopes) == 2


def test_soft_limit_delays_replies_more_and_more(
    make_controller: Any, handler: Any, loop_kind: str
) -> None:
    if loop_kind == "uvloop":
        pytest.skip("same engine path; run once, since it waits out its delays")
    controller = make_controller(
        handler, soft_error_limit=2, hard_error_limit=6, error_sleep_time=0.3
    )
    with SMTPClient.of(controller) as client:
        client.reply()
        took = []
        for _ in range(5):
            started = time.monotonic()
            assert client.command(BAD.rstrip()).code == 503
            took.append(time.monotonic() - started)
        started = time.monotonic()
        assert client.command(b"NOOP").code == 250  # every reply waits once past the soft limit
        took.append(time.monotonic() - started)
        assert client.command(BAD.rstrip()).code == 503
        assert codes(client.replies_until_close()) == [421]
    # errors 1 and 2 are free; the 3rd, 4th, 5th wait 0.3, 0.6, 0.9 s; the NOOP 0.9 s too.
    for wait, least in zip(took[2:], (0.3, 0.6, 0.9, 0.9), strict=True):
        assert wait >= least * 0.95, took


def test_the_delay_does_not_block_other_sessions(make_controller: Any, handler: Any) -> None:
    controller = make_controller(
        handler, soft_error_limit=1, hard_error_limit=5, error_sleep_time=8.0
    )
    with SMTPClient.of(controller) as slow:
        slow.reply()
        assert slow.command(BAD.rstrip()).code == 503
        slow.send(BAD)  # the 2nd error: its reply waits 8 s
        with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as other:
            other.sendmail("a@b", ["c@d"], b"Subject: meanwhile\r\n\r\nhi\r\n")
        readable, _, _ = select.select([slow.sock], [], [], 0)
        assert readable == [], "the delayed reply came before another session was served"
        assert slow.reply().code == 503  # and it does come
    assert len(handler.envelopes) == 1


# -- the relay: a directory harvest ends at the hard limit ----------------------------------------


@pytest.mark.skipif(not HAVE_SINK, reason="Postfix smtp-sink not installed")
def test_directory_harvest_is_cut_off(serve: Any, sink: Any) -> None:
    next_hop = sink("-f", "RCPT")  # the mailbox server knows none of the guessed users
    limits = SMTPSettings().replace(error_sleep_time=0.01)
    controller = serve(
        make_relay(next_hop.next_hop),
        soft_error_limit=limits.soft_error_limit,
        hard_error_limit=limits.hard_error_limit,
        junk_command_limit=limits.junk_command_limit,
        error_sleep_time=limits.error_sleep_time,
    )
    outcome: list[Any] = []

    def harvest() -> None:
        with smtplib.SMTP("127.0.0.1", controller.port, timeout=10) as client:
            client.ehlo("harvester.test")
            client.mail("a@ext.test")
            for i in range(10_000):
                code, text = client.rcpt(f"user{i}@{DOMAIN}")
                if not 500 <= code < 600:
                    outcome.append((i, code, text))
                    return

    thread = threading.Thread(target=harvest, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    # 20 guesses refused (smtp-sink: 500 5.3.0), the 20th followed by the 421, which smtplib
    # reads as the reply to the 21st.
    assert outcome == [(20, 421, TOO_MANY[4:].encode())], outcome


# -- the farm: the limits are on by default ---------------------------------------------------


def test_the_farm_turns_the_limits_on(farms: FarmRunner, tmp_path: Path) -> None:
    defaults = SMTPSettings()
    assert (
        defaults.soft_error_limit,
        defaults.hard_error_limit,
        defaults.junk_command_limit,
        defaults.error_sleep_time,
    ) == (10, 20, 100, 1.0)
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": "farm.handlers:Sink"},
        # The limits' own test blasts its commands: the synchronization check would end it first.
        smtp={"hostname": "farm.test", "error_sleep_time": 0.01, "forbid_unauth_pipelining": False},
    )
    farm = farms.start(config=config, workers=1)
    with SMTPClient(farm.port) as client:
        client.send(b"EHLO me\r\n" + b"NOOP\r\n" * 100 + BAD * 19 + b"NOOP\r\n" * 1000)
        replies = client.replies_until_close()
    assert codes(replies) == [220, 250] + [250] * 100 + [503] * 19 + [421]
    assert replies[-1].text == TOO_MANY
