"""farm.handlers over real sockets: an engine per test on its own loop thread, smtplib clients."""

from __future__ import annotations

import argparse
import asyncio
import email.message
import functools
import io
import logging
import mailbox
import smtplib
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from farm.controller import Controller
from farm.handlers import AsyncMessage, Debugging, Mailbox, Message, Proxy, Sink
from tests.support.relay import FakeNextHop, LoopThread, smtp_dialogue
from tests.support.wait import WAIT, wait_for

HOST = "127.0.0.1"

MESSAGE = (
    b"From: Anne Person <anne@example.com>\r\n"
    b"To: Bart Person <bart@example.com>\r\n"
    b"Subject: A test\r\n"
    b"Message-ID: <ant>\r\n"
    b"\r\n"
    b"Hi Bart, this is Anne.\r\n"
)


@pytest.fixture
def serve(make_controller: Any) -> Callable[..., Controller]:
    """``serve(handler, **smtp_kwargs)`` -> a started Controller with the bare engine's
    defaults (SMTPUTF8 off, unlike the Controller's)."""

    def start(handler: Any, **smtp_kwargs: Any) -> Controller:
        smtp_kwargs.setdefault("enable_SMTPUTF8", False)
        return make_controller(handler, **smtp_kwargs)

    return start


def client(server: Controller) -> smtplib.SMTP:
    return smtplib.SMTP(HOST, server.port, timeout=WAIT)


class Recorder:
    """An upstream handler that keeps what it received; optionally refuses some recipients."""

    def __init__(self, refuse: dict[str, str] | None = None, data_reply: str = "250 OK") -> None:
        self.refuse = refuse or {}
        self.data_reply = data_reply
        self.received: list[tuple[str, list[str], bytes, list[str]]] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(
            (envelope.mail_from, list(envelope.rcpt_tos), envelope.content, envelope.mail_options)
        )
        return self.data_reply


def relay_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "farm.handlers"]


# -- Debugging ---------------------------------------------------------------------------------


def test_debugging_prints_bytes_message_with_peer(serve: Callable[..., Controller]) -> None:
    stream = io.StringIO()
    server = serve(Debugging(stream))
    with client(server) as c:
        peer = c.sock.getsockname()
        assert c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE) == {}
    assert stream.getvalue() == (
        "---------- MESSAGE FOLLOWS ----------\n"
        f"mail options: ['SIZE={len(MESSAGE)}']\n"
        "\n"
        "From: Anne Person <anne@example.com>\n"
        "To: Bart Person <bart@example.com>\n"
        "Subject: A test\n"
        "Message-ID: <ant>\n"
        f"X-Peer: {peer!r}\n"
        "\n"
        "Hi Bart, this is Anne.\n"
        "------------ END MESSAGE ------------\n"
    )


def test_debugging_prints_str_content(serve: Callable[..., Controller]) -> None:
    stream = io.StringIO()
    server = serve(Debugging(stream), decode_data=True)
    with client(server) as c:
        c.helo("client.test")  # plain SMTP: no mail options
        peer = c.sock.getsockname()
        c.sendmail(
            "anne@example.com", ["bart@example.com"], "Subject: hi\r\n\r\nline 1\r\nline 2\r\n"
        )
    assert stream.getvalue() == (
        "---------- MESSAGE FOLLOWS ----------\n"
        "Subject: hi\n"
        f"X-Peer: {peer!r}\n"
        "\n"
        "line 1\n"
        "line 2\n"
        "------------ END MESSAGE ------------\n"
    )


def test_debugging_stream_and_from_cli() -> None:
    parser = argparse.ArgumentParser()
    assert Debugging().stream is sys.stdout
    assert Debugging.from_cli(parser).stream is sys.stdout
    assert Debugging.from_cli(parser, "stdout").stream is sys.stdout
    assert Debugging.from_cli(parser, "stderr").stream is sys.stderr
    for args in (("bogus",), ("stdout", "stderr")):
        with pytest.raises(SystemExit):
            Debugging.from_cli(parser, *args)


# -- Sink --------------------------------------------------------------------------------------


def test_sink_accepts_and_has_no_hooks(serve: Callable[..., Controller]) -> None:
    assert not [name for name in dir(Sink) if name.startswith("handle_")]
    server = serve(Sink())
    with client(server) as c:
        assert (
            c.sendmail("anne@example.com", ["bart@example.com", "cate@example.com"], MESSAGE) == {}
        )
        assert c.noop()[0] == 250


def test_sink_from_cli() -> None:
    parser = argparse.ArgumentParser()
    assert isinstance(Sink.from_cli(parser), Sink)
    with pytest.raises(SystemExit):
        Sink.from_cli(parser, "extra")


# -- Message and AsyncMessage ------------------------------------------------------------------


class CustomMessage(email.message.Message):
    pass


class Collecting(Message):
    def __init__(self, message_class: type[email.message.Message] | None = None) -> None:
        super().__init__(message_class)
        self.messages: list[email.message.Message] = []

    def handle_message(self, message: email.message.Message) -> None:
        self.messages.append(message)


class AsyncCollecting(AsyncMessage):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.messages: list[email.message.Message] = []
        self.loops: list[asyncio.AbstractEventLoop] = []

    async def handle_message(self, message: email.message.Message) -> None:
        await asyncio.sleep(0)
        self.loops.append(self.loop)
        self.messages.append(message)


def test_message_and_async_message_are_abstract() -> None:
    with pytest.raises(TypeError):
        Message()  # type: ignore[abstract]
    with pytest.raises(TypeError):
        AsyncMessage()  # type: ignore[abstract]


@pytest.mark.parametrize("decode_data", [False, True])
def test_message_gets_parsed_message_with_envelope_headers(
    serve: Callable[..., Controller], decode_data: bool
) -> None:
    handler = Collecting(CustomMessage)
    server = serve(handler, decode_data=decode_data)
    with client(server) as c:
        peer = c.sock.getsockname()
        c.sendmail("anne@example.com", ["bart@example.com", "cate@example.com"], MESSAGE)
    [message] = handler.messages
    assert isinstance(message, CustomMessage)
    assert message["Subject"] == "A test"
    assert message["X-Peer"] == str(peer)
    assert message["X-MailFrom"] == "anne@example.com"
    assert message["X-RcptTo"] == "bart@example.com, cate@example.com"
    assert message.get_payload() == "Hi Bart, this is Anne.\r\n"


def test_async_message_awaits_handle_message(serve: Callable[..., Controller]) -> None:
    handler = AsyncCollecting()
    server = serve(handler)
    with client(server) as c:
        c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE)
        c.sendmail("<>", ["cate@example.com"], MESSAGE)
    first, second = handler.messages
    assert type(first) is email.message.Message
    assert (first["X-MailFrom"], first["X-RcptTo"]) == ("anne@example.com", "bart@example.com")
    assert (second["X-MailFrom"], second["X-RcptTo"]) == ("<>", "cate@example.com")
    assert handler.loops == [server.loop, server.loop]


def test_async_message_keeps_given_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert AsyncCollecting(loop=loop).loop is loop
    finally:
        loop.close()


# -- Mailbox -----------------------------------------------------------------------------------


def test_mailbox_stores_messages_in_maildir(serve: Callable[..., Controller], tmp_path) -> None:
    path = tmp_path / "Maildir"
    handler = Mailbox(path)
    server = serve(handler)
    with client(server) as c:
        c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE)
        c.sendmail("cate@example.com", ["dave@example.com"], MESSAGE.replace(b"A test", b"Two"))
    stored = sorted(mailbox.Maildir(path, create=False), key=lambda m: m["X-MailFrom"])
    assert [(m["X-MailFrom"], m["X-RcptTo"], m["Subject"]) for m in stored] == [
        ("anne@example.com", "bart@example.com", "A test"),
        ("cate@example.com", "dave@example.com", "Two"),
    ]
    assert stored[0].get_payload() == "Hi Bart, this is Anne.\n"  # Maildir stores LF endings
    handler.reset()
    assert len(mailbox.Maildir(path, create=False)) == 0


def test_mailbox_from_cli(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    handler = Mailbox.from_cli(parser, str(tmp_path / "box"))
    assert handler.mail_dir == str(tmp_path / "box")
    assert (tmp_path / "box" / "new").is_dir()
    for args in ((), ("a", "b")):
        with pytest.raises(SystemExit):
            Mailbox.from_cli(parser, *args)


# -- Proxy -------------------------------------------------------------------------------------


def test_proxy_relays_with_x_peer(
    serve: Callable[..., Controller], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="farm.handlers")
    upstream = Recorder()
    up = serve(upstream)
    proxy = serve(Proxy(HOST, up.port))
    with client(proxy) as c:
        assert (
            c.sendmail("anne@example.com", ["bart@example.com", "cate@example.com"], MESSAGE) == {}
        )
    [(mail_from, rcpt_tos, content, _)] = upstream.received
    assert mail_from == "anne@example.com"
    assert rcpt_tos == ["bart@example.com", "cate@example.com"]
    assert content == MESSAGE.replace(b"\r\n\r\n", b"\r\nX-Peer: 127.0.0.1\r\n\r\n")
    [record] = relay_records(caplog)
    assert record.levelno == logging.INFO
    assert "outcome=250" in record.getMessage()
    assert f"upstream={HOST}:{up.port}" in record.getMessage()


def test_proxy_normalises_bare_cr_and_lf_as_the_relay_does(
    serve: Callable[..., Controller], loop_thread: LoopThread
) -> None:
    """smtplib dot-stuffs only after LF: a bare-CR ``<CR>.<CR>`` must not reach the upstream
    (issue 12 item 14). Stray CR, LF and NUL become spaces, as in ``farm.relay``."""

    async def script(reader: Any, writer: Any, hop: FakeNextHop) -> None:
        await smtp_dialogue(reader, writer, hop)

    upstream = FakeNextHop(script, loop_thread).start()  # records the raw DATA bytes
    proxy = serve(Proxy(HOST, upstream.port))
    body = b"Subject: cr\r\n\r\nline\r.\rMAIL FROM:<x@y>\rbare\nlf\x00nul\r\nend\r\n"
    with client(proxy) as c:
        assert c.sendmail("anne@example.com", ["bart@example.com"], body) == {}
    [raw] = upstream.messages
    assert raw == (
        b"Subject: cr\r\nX-Peer: 127.0.0.1\r\n\r\nline . MAIL FROM:<x@y> bare lf nul\r\nend\r\n"
    )


def test_proxy_relays_decoded_content_as_original_bytes(
    serve: Callable[..., Controller],
) -> None:
    upstream = Recorder()
    up = serve(upstream)
    proxy = serve(Proxy(HOST, up.port), decode_data=True)
    with client(proxy) as c:
        c.sendmail("anne@example.com", ["bart@example.com"], b"no headers, no blank line\r\n")
    [(_, _, content, _)] = upstream.received
    assert content == b"X-Peer: 127.0.0.1\r\nno headers, no blank line\r\n"


def test_proxy_forwards_8bitmime_when_upstream_offers_it(
    serve: Callable[..., Controller],
) -> None:
    upstream = Recorder()
    up = serve(upstream)
    proxy = serve(Proxy(HOST, up.port))
    body = "Subject: caf\u00e9\r\n\r\ncaf\u00e9\r\n".encode()
    with client(proxy) as c:
        c.sendmail("anne@example.com", ["bart@example.com"], body, mail_options=["BODY=8BITMIME"])
    [(_, _, content, options)] = upstream.received
    assert "BODY=8BITMIME" in options
    assert content == body.replace(b"\r\n\r\n", b"\r\nX-Peer: 127.0.0.1\r\n\r\n")


def test_proxy_partial_refusal_is_accepted_and_logged(
    serve: Callable[..., Controller], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="farm.handlers")
    upstream = Recorder(refuse={"nobody@example.com": "550 5.1.1 No such user"})
    up = serve(upstream)
    proxy = serve(Proxy(HOST, up.port))
    with client(proxy) as c:
        c.sendmail("anne@example.com", ["nobody@example.com", "bart@example.com"], MESSAGE)
    [(_, rcpt_tos, _, _)] = upstream.received
    assert rcpt_tos == ["bart@example.com"]
    [record] = relay_records(caplog)
    assert "refused=1" in record.getMessage()
    assert "outcome=250" in record.getMessage()


@pytest.mark.parametrize("refusal", ["550 5.1.1 No such user", "450 4.2.1 Mailbox busy, try later"])
def test_proxy_passes_through_refusal_of_all_recipients(
    serve: Callable[..., Controller], caplog: pytest.LogCaptureFixture, refusal: str
) -> None:
    caplog.set_level(logging.INFO, logger="farm.handlers")
    up = serve(Recorder(refuse={"nobody@example.com": refusal}))
    proxy = serve(Proxy(HOST, up.port))
    with client(proxy) as c:
        with pytest.raises(smtplib.SMTPDataError) as info:
            c.sendmail("anne@example.com", ["nobody@example.com"], MESSAGE)
        assert (info.value.smtp_code, info.value.smtp_error.decode()) == (
            int(refusal[:3]),
            refusal[4:],
        )
        assert c.noop()[0] == 250  # the session goes on
    [record] = relay_records(caplog)
    assert record.levelno == logging.WARNING
    assert f"outcome={refusal[:3]}" in record.getMessage()


def test_proxy_temporary_refusal_wins_over_permanent(serve: Callable[..., Controller]) -> None:
    up = serve(
        Recorder(
            refuse={
                "gone@example.com": "550 5.1.1 No such user",
                "busy@example.com": "452 4.2.2 Mailbox full",
            }
        )
    )
    proxy = serve(Proxy(HOST, up.port))
    with client(proxy) as c, pytest.raises(smtplib.SMTPDataError) as info:
        c.sendmail("anne@example.com", ["gone@example.com", "busy@example.com"], MESSAGE)
    assert info.value.smtp_code == 452


def test_proxy_passes_through_upstream_data_refusal(serve: Callable[..., Controller]) -> None:
    up = serve(Recorder(data_reply="554 5.6.0 Message rejected"))
    proxy = serve(Proxy(HOST, up.port))
    with client(proxy) as c, pytest.raises(smtplib.SMTPDataError) as info:
        c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE)
    assert (info.value.smtp_code, info.value.smtp_error) == (554, b"5.6.0 Message rejected")


def test_proxy_unreachable_upstream_gives_451(
    serve: Callable[..., Controller], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="farm.handlers")
    # A bound socket that never listens: connecting to its port is refused, and no other
    # process can take the port while the test runs.
    with socket.socket() as closed:
        closed.bind((HOST, 0))
        proxy = serve(Proxy(HOST, closed.getsockname()[1]))
        with client(proxy) as c:
            with pytest.raises(smtplib.SMTPDataError) as info:
                c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE)
            assert info.value.smtp_code == 451
            assert info.value.smtp_error.startswith(b"4.4.1 ")
            assert c.noop()[0] == 250
    [record] = relay_records(caplog)
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    message = record.getMessage()
    assert "outcome=451" in message
    assert "ConnectionRefusedError" in message
    assert "\n" not in message
    assert not [r for r in caplog.records if r.exc_info]


class SlowUpstream(Recorder):
    """Holds every DATA until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = asyncio.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.entered.set()
        await self.release.wait()
        return await super().handle_DATA(server, session, envelope)


def test_proxy_does_not_block_the_loop_while_relaying(serve: Callable[..., Controller]) -> None:
    upstream = SlowUpstream()
    up = serve(upstream)
    proxy = serve(Proxy(HOST, up.port))
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            with client(proxy) as c:
                outcome["refused"] = c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE)
        except Exception as error:  # reported by the assertion below
            outcome["error"] = error

    sender = threading.Thread(target=send, name="slow-sender")
    sender.start()
    try:
        assert upstream.entered.wait(WAIT), "the relay never reached the upstream"
        # The proxy's loop is mid-relay; a second session on it must still be served.
        with client(proxy) as second:
            assert second.noop()[0] == 250
        assert sender.is_alive()
        assert upstream.received == []
    finally:
        up.loop.call_soon_threadsafe(upstream.release.set)
        sender.join(WAIT)
    assert not sender.is_alive()
    assert outcome == {"refused": {}}
    assert len(upstream.received) == 1


def test_proxy_declares_size_when_offered(serve: Callable[..., Controller]) -> None:
    upstream = Recorder()
    up = serve(upstream)  # the engine offers SIZE
    proxy = serve(Proxy(HOST, up.port, timeout=None))  # None: no bound, as smtplib's
    with client(proxy) as c:
        assert c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE) == {}
    [(_, _, content, options)] = upstream.received
    assert f"SIZE={len(content)}" in options


def test_proxy_upstream_lost_mid_transaction_gives_451(
    serve: Callable[..., Controller], loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="farm.handlers")

    def answer(line: bytes, transaction: int) -> bytes | None:
        return b"" if line.upper().startswith(b"DATA") else None  # b"": close, no reply

    async def script(reader: Any, writer: Any, hop: FakeNextHop) -> None:
        await smtp_dialogue(reader, writer, hop, answer)

    upstream = FakeNextHop(script, loop_thread).start()
    proxy = serve(Proxy(HOST, upstream.port))
    with client(proxy) as c:
        with pytest.raises(smtplib.SMTPDataError) as info:
            c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE)
        assert info.value.smtp_code == 451
        assert info.value.smtp_error.startswith(b"4.4.2 ")
        assert c.noop()[0] == 250
    [record] = relay_records(caplog)
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert "outcome=451" in record.getMessage()
    assert not [r for r in caplog.records if r.exc_info]


def test_proxy_timeout_bounds_a_silent_upstream(
    serve: Callable[..., Controller], loop_thread: LoopThread
) -> None:
    def answer(line: bytes, transaction: int) -> bytes | None:
        return b"" if line == b".\r\n" else None  # the message is never answered

    async def script(reader: Any, writer: Any, hop: FakeNextHop) -> None:
        await smtp_dialogue(reader, writer, hop, answer)

    upstream = FakeNextHop(script, loop_thread).start()
    proxy = serve(Proxy(HOST, upstream.port, timeout=0.5))
    with client(proxy) as c:
        with pytest.raises(smtplib.SMTPDataError) as info:
            c.sendmail("anne@example.com", ["bart@example.com"], MESSAGE)
        assert info.value.smtp_code == 451
        assert info.value.smtp_error.startswith(b"4.4.2 ")
    assert len(upstream.messages) == 1  # the upstream had it, and never said so
    wait_for(lambda: upstream.closed == 1, "the proxy to drop the silent upstream")


def test_proxy_upstream_closing_at_rcpt_gives_451(
    serve: Callable[..., Controller], loop_thread: LoopThread
) -> None:
    def answer(line: bytes, transaction: int) -> bytes | None:
        if line.upper().startswith(b"RCPT TO:<CATE@"):
            return b"421 4.3.2 Shutting down\r\n"
        return None

    async def script(reader: Any, writer: Any, hop: FakeNextHop) -> None:
        await smtp_dialogue(reader, writer, hop, answer)

    upstream = FakeNextHop(script, loop_thread).start()
    proxy = serve(Proxy(HOST, upstream.port))
    with client(proxy) as c, pytest.raises(smtplib.SMTPDataError) as info:
        c.sendmail("anne@example.com", ["bart@example.com", "cate@example.com"], MESSAGE)
    assert (info.value.smtp_code, info.value.smtp_error) == (451, b"4.3.2 Shutting down")
    assert upstream.messages == []
    assert not [line for line in upstream.lines if line.upper().startswith(b"DATA")]


@pytest.mark.parametrize("upstream_utf8", [True, False])
def test_proxy_smtputf8(serve: Callable[..., Controller], upstream_utf8: bool) -> None:
    upstream = Recorder()
    up = serve(upstream, enable_SMTPUTF8=upstream_utf8)
    proxy = serve(Proxy(HOST, up.port), enable_SMTPUTF8=True)
    with client(proxy) as c:
        send = functools.partial(
            c.sendmail, "ann\u00e9@example.com", ["b\u00e4rt@example.com"], MESSAGE, ["SMTPUTF8"]
        )
        if upstream_utf8:
            assert send() == {}
            [(mail_from, rcpt_tos, _, options)] = upstream.received
            assert (mail_from, rcpt_tos) == ("ann\u00e9@example.com", ["b\u00e4rt@example.com"])
            assert "SMTPUTF8" in options
        else:
            with pytest.raises(smtplib.SMTPDataError) as info:
                send()
            assert info.value.smtp_code == 553
            assert upstream.received == []


class ClosingHandler:
    """Records the senders of the sessions whose connection ended (the ``handle_CLOSE`` hook)."""

    def __init__(self) -> None:
        self.closed: list[str | None] = []
        self.abandoned = threading.Event()

    async def handle_CLOSE(self, server: Any, session: Any, envelope: Any) -> None:
        self.closed.append(envelope.mail_from)
        if envelope.mail_from is not None:
            self.abandoned.set()


def test_handle_close_runs_once_when_the_client_leaves(make_controller: Any) -> None:
    handler = ClosingHandler()
    controller = make_controller(handler)
    client = smtplib.SMTP(controller.hostname, controller.port, timeout=WAIT)
    client.ehlo("client.test")
    client.mail("anne@example.com")
    client.close()  # vanish mid-transaction, no QUIT
    assert handler.abandoned.wait(WAIT)  # the abandoned transaction is visible to the hook
    assert handler.closed.count("anne@example.com") == 1


class PlainHooks:
    """Hooks written as plain functions (a farm extension): each records whether it ran in a
    task; ``handle_RSET`` returns a coroutine that waits (an awaitable result)."""

    def __init__(self) -> None:
        self.in_task: dict[str, bool] = {}
        self.closed = threading.Event()
        self.reset_waited = False

    def _seen(self, name: str) -> None:
        self.in_task[name] = asyncio.current_task() is not None

    def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self._seen("MAIL")
        envelope.mail_from = address
        return "250 OK sender noted"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self._seen("RCPT")
        envelope.rcpt_tos.append(address)
        return "250 OK"

    def handle_RSET(self, server: Any, session: Any, envelope: Any) -> Any:
        self._seen("RSET")

        async def later() -> str:
            self.reset_waited = asyncio.current_task() is not None  # its own task from the start
            async with asyncio.timeout(WAIT):  # (which needs a task)
                await asyncio.sleep(0.01)
            return "250 OK reset after a wait"

        return later()

    def handle_CLOSE(self, server: Any, session: Any, envelope: Any) -> None:
        self._seen("CLOSE")
        self.closed.set()


def test_plain_function_hooks_run_without_a_task(make_controller: Any) -> None:
    """A ``def`` hook runs at once (no task); an ``async def`` hook in a task; a coroutine a
    plain hook returns runs in a task of its own (asyncio.timeout works in it), and its reply is
    the one sent."""
    handler = PlainHooks()
    controller = make_controller(handler)
    with smtplib.SMTP(controller.hostname, controller.port, timeout=WAIT) as smtp:
        smtp.ehlo("client.test")
        assert smtp.mail("anne@example.com") == (250, b"OK sender noted")
        assert smtp.rcpt("bart@example.com")[0] == 250
        assert smtp.rset() == (250, b"OK reset after a wait")
        assert smtp.noop()[0] == 250  # the session goes on after the wait
    assert handler.closed.wait(WAIT)
    assert handler.in_task == {"MAIL": False, "RCPT": True, "RSET": False, "CLOSE": False}
    assert handler.reset_waited


def test_a_resumed_command_cancelled_after_its_future_is_done_sees_the_cancellation() -> None:
    """A command that started outside a task and went on in one (``_resume``) gets a
    cancellation that comes after the future it waits for is done, as it would in a task: a
    hung-hook timeout stops it instead of letting it finish."""
    from farm.smtp.server import _resume

    seen: list[str] = []

    async def command(future: asyncio.Future[None]) -> None:
        try:
            await future
            seen.append("went on")
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        coro = command(future)
        waiting_for = coro.send(None)  # as _run_inline starts it: it waits for the future
        assert waiting_for is future
        task = loop.create_task(_resume(coro, waiting_for))
        await asyncio.sleep(0)  # the task now waits for the future
        future.set_result(None)
        task.cancel()  # before the task runs again
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == ["cancelled"]
