"""Shared fixtures: servers on free loopback ports, stopped by the test that started them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farm.controller import Controller
from tests.support.farms import FarmRunner

#: The relay tests' fixtures (sink, serve, loop_thread), the DNS tests' (mail_dns, own_dns),
#: the scanning tests' (rspamd and friends).
pytest_plugins = [
    "tests.support.relay",
    "tests.support.dns_server",
    "tests.support.rspamd",
    "tests.support.tls",
]


class RecordingHandler:
    """Keeps every delivered envelope; ``received`` is set on each delivery."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []
        self.sessions: list[Any] = []
        self.received = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        self.sessions.append(session)
        self.received.set()
        return "250 OK"


@pytest.fixture
def handler() -> RecordingHandler:
    return RecordingHandler()


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A fresh event loop: ``"asyncio"`` or ``"uvloop"``."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@pytest.fixture
def loop_kind() -> str:
    """The event loop the engine runs on; modules override this to run on both."""
    return "asyncio"


@pytest.fixture
def make_controller(loop_kind: str) -> Iterator[Any]:
    """Factory: ``make_controller(handler, **smtp_kwargs)`` -> a started Controller on 127.0.0.1."""
    started: list[Controller] = []
    loops: list[asyncio.AbstractEventLoop] = []

    def make(handler: Any, **kwargs: Any) -> Controller:
        if "loop" not in kwargs:
            kwargs["loop"] = new_loop(loop_kind)
            loops.append(kwargs["loop"])
        kwargs.setdefault("hostname", "127.0.0.1")
        kwargs.setdefault("port", 0)
        kwargs.setdefault("server_hostname", "farm.test")
        kwargs.setdefault("ready_timeout", 10.0)
        controller = Controller(handler, **kwargs)
        controller.start()
        started.append(controller)
        return controller

    yield make
    for controller in started:
        if controller._thread is not None:
            controller.stop()
    for loop in loops:
        loop.close()


@pytest.fixture
def controller(make_controller: Any, handler: RecordingHandler) -> Controller:
    """A started Controller with a RecordingHandler and aiosmtpd's SMTP defaults."""
    return make_controller(handler, enable_SMTPUTF8=False)


@pytest.fixture
def farms(tmp_path: Path) -> Iterator[FarmRunner]:
    """Starts ``farm serve`` processes for one test; kills whatever is left at teardown."""
    runner = FarmRunner(tmp_path)
    yield runner
    runner.cleanup()
