"""A worker's protocol factory never raises: a session that cannot be set up is answered 421,
and the listener keeps accepting (uvloop closes a server whose factory raised, for good)."""

from __future__ import annotations

import asyncio
import logging
import smtplib
from typing import Any

import pytest

from farm.handlers import Sink
from farm.smtp import SMTP
from farm.supervisor.session_guard import guarded
from tests.conftest import new_loop
from tests.support.loops import both_loops  # noqa: F401 (asyncio and uvloop)

WAIT = 30.0


def _talk(port: int) -> tuple[int, str]:
    """Connect, and send a message if greeted: the greeting's code, and what came of it."""
    try:
        client = smtplib.SMTP("127.0.0.1", port, timeout=WAIT)
    except smtplib.SMTPConnectError as refused:
        return refused.smtp_code, refused.smtp_error.decode()
    with client:
        refused_rcpts = client.sendmail(
            "a@guard.test", ["b@guard.test"], b"Subject: x\r\n\r\nhi\r\n"
        )
        return 220, f"sent, refused: {refused_rcpts}"


async def _three_clients(loop: asyncio.AbstractEventLoop) -> list[tuple[int, str]]:
    build = SMTP.protocol_factory(Sink(), loop=loop, hostname="guard.test")
    calls = 0

    def first_two_fail() -> Any:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("no session today")
        return build()

    server = await loop.create_server(guarded(first_two_fail, "guard.test"), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        return [
            await asyncio.wait_for(loop.run_in_executor(None, _talk, port), WAIT) for _ in range(3)
        ]
    finally:
        server.close()
        await server.wait_closed()


def test_a_session_that_cannot_be_set_up_is_421_and_the_listener_goes_on(
    loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    loop = new_loop(loop_kind)
    try:
        with caplog.at_level(logging.ERROR, logger="farm.worker"):
            results = loop.run_until_complete(_three_clients(loop))
    finally:
        loop.close()
    unavailable = "guard.test Service not available, closing transmission channel"
    assert results == [
        (421, f"4.3.2 {unavailable}"),
        (421, f"4.3.2 {unavailable}"),
        (220, "sent, refused: {}"),
    ]
    errors = [r for r in caplog.records if r.name == "farm.worker"]
    assert [r.getMessage() for r in errors] == [
        "cannot set up a session (RuntimeError: no session today; 1 so far): answered 421",
        "cannot set up a session (RuntimeError: no session today; 2 so far): answered 421",
    ]
    assert errors[0].exc_info and not errors[1].exc_info  # one traceback, then a line each
