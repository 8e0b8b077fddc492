"""The engine's stage interface (farm.smtp.stages): where each hook runs, the end-of-data chain
(header edits seen by the next stage, a refusal or tempfail ending it before the handler), a
stage's own failure, and the header editing helpers. Real SMTP clients, a real Controller."""

from __future__ import annotations

import smtplib
from typing import Any

import pytest

from farm.smtp.stages import EndOfData, Stage, edit_header, header_end, header_fields
from tests.support.client import smtp_greeting
from tests.support.loops import both_loops  # noqa: F401 (every engine test on asyncio and uvloop)
from tests.support.wait import WAIT, wait_for


class Recorder(Stage):
    """Records the calls; adds ``X-Seen-By`` naming the headers it found at end of data."""

    name = "recorder"

    def __init__(self, label: str, reply: str | None = None) -> None:
        self.label = label
        self.reply = reply
        self.calls: list[str] = []

    def connect(self, session: Any) -> None:
        self.calls.append("connect")

    async def mail(self, session: Any, envelope: Any, address: str) -> str | None:
        self.calls.append(f"mail {address}")
        return None

    async def rcpt(self, session: Any, envelope: Any, address: str) -> str | None:
        self.calls.append(f"rcpt {address}")
        return "550 5.7.1 not this one" if address.startswith("refused@") else None

    async def end_of_data(self, session: Any, envelope: Any) -> EndOfData:
        names = [name for name, *_ in header_fields(envelope.original_content)]
        self.calls.append("end " + ",".join(names))
        if self.reply is not None:
            return EndOfData(reply=self.reply)
        return EndOfData(
            add_headers=((f"X-{self.label}", "checked"),),
            remove_headers=lambda name, value: name.lower() == "x-remove-me",
        )

    def close(self, session: Any) -> None:
        self.calls.append("close")

    def message_log(self, session: Any, envelope: Any) -> str:
        return f"{self.label.lower()}=ok"


def test_stages_run_in_order_and_each_sees_the_edits_before_it(
    make_controller: Any, handler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    first, second = Recorder("First"), Recorder("Second")
    controller = make_controller(handler, stages=[first, second])
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("client.test")
        client.mail("a@example.test")
        assert client.rcpt("refused@mx.test")[0] == 550
        assert client.rcpt("bob@mx.test")[0] == 250
        client.data(b"X-Remove-Me: 1\r\nSubject: hi\r\n\r\nbody\r\n")
    content = handler.envelopes[-1].content
    assert content == b"X-Second: checked\r\nX-First: checked\r\nSubject: hi\r\n\r\nbody\r\n"
    wait_for(lambda: first.calls[-1] == second.calls[-1] == "close", what="close() calls")
    assert "end X-Remove-Me,Subject" in first.calls
    assert "end X-First,Subject" in second.calls  # the first stage's edit, already applied
    assert "rcpt refused@mx.test" in first.calls and "rcpt refused@mx.test" not in second.calls
    assert "first=ok second=ok" in caplog.text


@pytest.mark.parametrize("reply", ["451 4.7.1 try again later", "554 5.7.1 content refused"])
def test_a_stage_reply_ends_the_transaction_before_the_handler(
    make_controller: Any, handler: Any, reply: str
) -> None:
    after = Recorder("After")
    controller = make_controller(handler, stages=[Recorder("Refuser", reply), after])
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("client.test")
        client.mail("a@example.test")
        client.rcpt("bob@mx.test")
        code, text = client.data(b"Subject: hi\r\n\r\nbody\r\n")
        assert f"{code} {text.decode()}" == reply
        assert client.mail("a@example.test")[0] == 250  # the transaction was reset
    assert not handler.envelopes
    assert not any(call.startswith("end") for call in after.calls)


class Broken(Stage):
    async def greet(self, session: Any) -> str | None:
        raise RuntimeError("a bug in a stage")

    async def end_of_data(self, session: Any, envelope: Any) -> EndOfData:
        raise RuntimeError("a bug in a stage")


def test_a_failing_stage_never_gives_a_250_and_never_strands_the_client(
    make_controller: Any, handler: Any
) -> None:
    controller = make_controller(handler, stages=[Broken()])
    assert smtp_greeting(controller.port).startswith("220 ")  # greeted all the same
    with smtplib.SMTP("127.0.0.1", controller.port, timeout=WAIT) as client:
        client.ehlo("client.test")
        client.mail("a@example.test")
        client.rcpt("bob@mx.test")
        assert client.data(b"Subject: hi\r\n\r\nbody\r\n")[0] == 451
        assert client.mail("a@example.test")[0] == 250
    assert not handler.envelopes


def test_header_helpers() -> None:
    message = (
        b"Received: from a\r\n\tby b\r\nAuthentication-Results: x; spf=pass\r\n"
        b"Subject: hi\r\n\r\nAuthentication-Results: in the body\r\n"
    )
    assert header_end(message) == message.index(b"\r\n\r\n") + 2
    assert [name for name, *_ in header_fields(message)] == [
        "Received",
        "Authentication-Results",
        "Subject",
    ]
    edited = edit_header(
        message, [("A", "1")], lambda name, value: name == "Authentication-Results"
    )
    assert edited == (
        b"A: 1\r\nReceived: from a\r\n\tby b\r\nSubject: hi\r\n\r\n"
        b"Authentication-Results: in the body\r\n"
    )
    assert header_end(b"Subject: no body") == len(b"Subject: no body")
    assert header_end(b"\r\nbody") == 0
    assert edit_header(b"Subject: x\n\nbody\n", [("A", "1")]) == b"A: 1\r\nSubject: x\n\nbody\n"
