"""Large messages: memory stays within a few copies, and the loop keeps serving others."""

from __future__ import annotations

import asyncio
import smtplib
import threading
import tracemalloc
from typing import Any

import pytest

from tests.support.client import Reply, SMTPClient, codes

MESSAGE_SIZE = 30 * 1024 * 1024


def build_body(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line))
    return b"..starts with a stuffed dot\r\n" + body


def send_raw_message(controller: Any, body: bytes) -> Reply:
    """``body`` (already stuffed) in one DATA transaction; the reply to the final dot."""
    with SMTPClient.of(controller, timeout=60, greeting=True) as client:
        assert client.command("EHLO me").code == 250
        client.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
        assert codes([client.reply() for _ in range(3)]) == [250, 250, 354]
        client.send(body)  # not body + b".\r\n": no copy of it on the traced heap
        client.send(b".\r\n")
        reply = client.reply()
        client.send(b"QUIT\r\n")
        return reply


class LagProbe:
    """Measures the worst wake-up delay of a 10 ms ticker running on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.worst = 0.0
        self.stop = threading.Event()
        self.running = threading.Event()
        self.future = asyncio.run_coroutine_threadsafe(self._tick(), loop)

    async def _tick(self) -> None:
        self.running.set()
        while not self.stop.is_set():
            before = self.loop.time()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, self.loop.time() - before - 0.01)


@pytest.mark.slow
def test_30mb_message_memory_and_loop_lag(make_controller: Any, handler: Any) -> None:
    controller = make_controller(handler, data_size_limit=64 * 1024 * 1024)
    body = build_body(MESSAGE_SIZE)
    probe = LagProbe(controller.loop)
    assert probe.running.wait(10)
    tracemalloc.start()
    try:
        reply = send_raw_message(controller, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        probe.stop.set()
        probe.future.result(10)
    assert reply == "250 OK\r\n"
    content = handler.envelopes[0].content
    assert content.startswith(b".starts with a stuffed dot\r\nxxx")
    assert len(content) == len(body) - 1
    # The receive buffer plus one copy out of it (and allocator slack): well under 3 copies.
    assert peak < 3 * len(body), f"peak {peak / 1e6:.0f} MB for a {len(body) / 1e6:.0f} MB message"
    # Generous bound: a stall of the whole message's processing would take far longer.
    assert probe.worst < 0.5, f"loop stalled for {probe.worst:.3f}s"


@pytest.mark.slow
def test_other_sessions_are_served_during_a_large_upload(
    make_controller: Any, handler: Any
) -> None:
    controller = make_controller(handler, data_size_limit=64 * 1024 * 1024)
    body = build_body(MESSAGE_SIZE)
    with SMTPClient.of(controller, timeout=60, greeting=True) as big:
        big.send(b"HELO me\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
        assert codes([big.reply() for _ in range(4)]) == [250, 250, 250, 354]
        big.send(body[: len(body) // 2])
        # Mid-upload, another client completes a whole transaction.
        with smtplib.SMTP(controller.hostname, controller.port, timeout=30) as other:
            other.sendmail("x@y", ["z@w"], b"small\r\n")
        assert handler.received.is_set()
        big.send(body[len(body) // 2 :] + b".\r\n")
        assert big.reply() == "250 OK\r\n"
    assert [len(e.content) for e in handler.envelopes] == [len(b"small\r\n"), len(body) - 1]
