"""The first idle deadline of a ``protocol_factory`` server's sessions, kept by one timer
(farm.smtp.timer_queue): idle sessions still time out, active ones do not, closed ones are
forgotten (real sockets and smtplib for the engine; a real event loop for the queue)."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import socket
import time

import pytest

from farm.handlers import Sink
from farm.smtp import SMTP
from farm.smtp.timer_queue import TimerQueue
from tests.support.serving import serve_blocking
from tests.support.wait import WAIT

TIMEOUT = 1.0


def _idle_until_closed(port: int) -> tuple[float, bytes]:
    """Read the greeting, send nothing: (seconds until the server closed, what it said)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        reader = sock.makefile("rb")
        greeting = reader.readline()
        assert greeting.startswith(b"220"), greeting
        started = time.monotonic()
        said = reader.read()  # until the server closes
        return time.monotonic() - started, said


def _active_then_idle(port: int) -> tuple[list[int], float, bytes]:
    """NOOPs for twice the timeout, then idle: the NOOPs' codes, then as above."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        codes = []
        until = time.monotonic() + 2 * TIMEOUT
        while True:
            sock.sendall(b"NOOP\r\n")
            codes.append(int(reader.readline()[:3]))
            started = time.monotonic()  # the client's last word was answered
            if started >= until:
                break
            time.sleep(TIMEOUT / 5)  # (pacing the client, so that it stays active)
        said = reader.read()
        return codes, time.monotonic() - started, said


def _quits_at_once(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        return client.noop()[0]


def test_idle_sessions_time_out_active_ones_do_not(caplog: pytest.LogCaptureFixture) -> None:
    factory = SMTP.protocol_factory(Sink(), hostname="farm.test", timeout=TIMEOUT)
    with caplog.at_level(logging.INFO, logger="farm.smtp"):
        idle, active, quick, idle_later = serve_blocking(
            factory, _idle_until_closed, _active_then_idle, _quits_at_once, _idle_until_closed
        )
    for waited, said in (idle, idle_later, active[1:]):
        assert said.startswith(b"421 4.4.2 farm.test Error: timeout exceeded"), said
        assert TIMEOUT * 0.99 <= waited < WAIT, waited
    assert active[0] and set(active[0]) == {250}, active  # never timed out while active
    assert quick == 250
    assert caplog.text.count(" timeout") == 3, caplog.text
    assert "timer failed" not in caplog.text


class _Session:
    def __init__(self, name: str, calls: list[str], fail: bool = False) -> None:
        self.name, self.calls, self.fail = name, calls, fail

    def _on_timer(self) -> None:
        self.calls.append(self.name)
        if self.fail:
            raise RuntimeError("broken session")


def test_deadlines_come_in_order_and_a_discarded_session_never_expires(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        queue = TimerQueue(0.2)
        first, gone, broken, last = (
            _Session("first", calls),
            _Session("gone", calls),
            _Session("broken", calls, fail=True),
            _Session("last", calls),
        )
        for session in (first, gone, broken):
            queue.add(session, loop)
        assert queue.when(first) is not None and queue.when(first) <= queue.when(gone)  # type: ignore[operator]
        queue.discard(gone)
        assert queue.when(gone) is None
        await asyncio.sleep(0.05)
        queue.add(last, loop)
        deadline = loop.time() + WAIT
        while len(calls) < 3 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert len(queue) == 0  # (and no timer left armed: nothing is due)

    asyncio.run(scenario())
    assert calls == ["first", "broken", "last"]
    assert "a session's timer failed" in caplog.text  # logged; "last" still expired
