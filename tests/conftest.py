"""Shared fixtures: servers on free loopback ports, stopped by the test that started them."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from farm.controller import Controller


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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


@pytest.fixture
def make_controller() -> Iterator[Any]:
    """Factory: ``make_controller(handler, **smtp_kwargs)`` -> a started Controller on 127.0.0.1."""
    started: list[Controller] = []

    def make(handler: Any, **kwargs: Any) -> Controller:
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


@pytest.fixture
def controller(make_controller: Any, handler: RecordingHandler) -> Controller:
    """A started Controller with a RecordingHandler and aiosmtpd's SMTP defaults."""
    return make_controller(handler, enable_SMTPUTF8=False)
