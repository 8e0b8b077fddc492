"""End-of-data stages (``farm.smtp.stages.Stage``) beyond what test_stages.py covers, on
asyncio and uvloop: a stage editing the envelope directly (as the content scanner does, with
body and envelope edits that go beyond ``EndOfData``), a 2xx reply that accepts a message
without delivering it (a milter's discard), and stages run for a handler without handle_DATA
and after BDAT LAST. Real scanners as stages are tested in test_scan_serve.py.
"""

from __future__ import annotations

import smtplib
from typing import Any

from farm.smtp.stages import GO_ON, EndOfData, Stage
from tests.conftest import RecordingHandler
from tests.support.client import SMTPClient
from tests.support.loops import both_loops  # noqa: F401  (runs every test on both loops)
from tests.support.wait import WAIT


class Editor(Stage):
    """Records what it saw; prepends a header to the envelope itself, or answers ``reply``."""

    name = "editor"

    def __init__(self, reply: str | None = None) -> None:
        self.reply = reply
        self.seen: list[bytes] = []

    async def end_of_data(self, session: Any, envelope: Any) -> EndOfData:
        self.seen.append(envelope.original_content)
        if self.reply is not None:
            return EndOfData(self.reply)
        content = b"X-Stage: seen\r\n" + envelope.original_content
        envelope.original_content = envelope.content = content
        return GO_ON


def send(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        client.ehlo("client.example")
        client.mail("a@example.com")
        client.rcpt("b@example.org")
        return client.data("Subject: hi\r\n\r\nbody\r\n")


def test_envelope_edits_are_seen_by_the_next_stage_and_the_handler(
    make_controller: Any,
) -> None:
    handler = RecordingHandler()
    first, second = Editor(), Editor()
    controller = make_controller(handler, stages=[first, second])
    assert send(controller.port)[0] == 250
    assert first.seen == [b"Subject: hi\r\n\r\nbody\r\n"]
    assert second.seen == [b"X-Stage: seen\r\nSubject: hi\r\n\r\nbody\r\n"]
    (envelope,) = handler.envelopes
    assert envelope.content == b"X-Stage: seen\r\nX-Stage: seen\r\nSubject: hi\r\n\r\nbody\r\n"


def test_a_2xx_reply_accepts_without_the_handler(make_controller: Any) -> None:
    handler = RecordingHandler()
    later = Editor()
    controller = make_controller(handler, stages=[Editor("250 2.7.0 Ok, discarded"), later])
    assert send(controller.port) == (250, b"2.7.0 Ok, discarded")
    assert handler.envelopes == [] and later.seen == []


def test_stages_run_without_handle_data_and_after_bdat(make_controller: Any) -> None:
    """A handler without handle_DATA: the stage still runs, then 250; BDAT LAST too."""
    stage = Editor()
    controller = make_controller(object(), stages=[stage], chunking=True)
    assert send(controller.port)[0] == 250
    client = SMTPClient(controller.port)
    try:
        client.reply()
        client.command("EHLO client.example")
        client.command("MAIL FROM:<a@example.com>")
        client.command("RCPT TO:<b@example.org>")
        client.send("BDAT 6 LAST\r\nhello\n")
        assert client.reply().startswith("250")
    finally:
        client.close()
    assert stage.seen == [b"Subject: hi\r\n\r\nbody\r\n", b"hello\n"]
