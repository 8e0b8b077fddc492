"""Controllers: the seed doctest, start/stop semantics, draining stop, Unix and unthreaded."""

from __future__ import annotations

import asyncio
import doctest
import fcntl
import smtplib
import threading
from pathlib import Path
from typing import Any

import pytest

from farm.controller import (
    Controller,
    UnixSocketController,
    UnthreadedController,
    get_localhost,
)
from farm.smtp import SMTP
from tests.support.client import SMTPClient, codes
from tests.support.net import refused, taken_port

SPEC = Path(__file__).resolve().parents[3] / "shared" / "spec" / "controller.rst"
README = Path(__file__).resolve().parents[2] / "README.md"


class CRLFTolerantChecker(doctest.OutputChecker):
    """Messages carry CRLF line ends; printed, they must compare equal to the LF examples."""

    def check_output(self, want: str, got: str, optionflags: int) -> bool:
        return super().check_output(want, got.replace("\r\n", "\n"), optionflags)


def run_doctest_text(text: str, name: str) -> doctest.TestResults:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, {}, name, name, 0)
    runner = doctest.DocTestRunner(checker=CRLFTolerantChecker(), optionflags=doctest.ELLIPSIS)
    runner.run(test)
    return runner.summarize(verbose=False)


@pytest.mark.skipif(not SPEC.exists(), reason="shared/spec/controller.rst is not beside the repo")
def test_seed_controller_doctest() -> None:
    text = SPEC.read_text()
    text = text.replace("from aiosmtpd.controller import", "from farm.controller import")
    text = text.replace("from aiosmtpd.handlers import", "from farm.handlers import")
    assert "aiosmtpd" not in "\n".join(
        line for line in text.splitlines() if line.lstrip().startswith(">>> from")
    )
    # The documented example binds the default port 8025: serialise concurrent runs.
    with open("/tmp/farm-controller-doctest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = run_doctest_text(text, "controller.rst")
    assert results.attempted > 10
    assert results.failed == 0


def test_readme_examples() -> None:
    results = run_doctest_text(README.read_text(), "README.md")
    assert results.attempted >= 3
    assert results.failed == 0


def test_start_stop_and_refused_after_stop(handler: Any) -> None:
    controller = Controller(handler, hostname="127.0.0.1", port=0, ready_timeout=10)
    controller.start()
    assert controller.port != 0
    with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
        assert client.noop() == (250, b"OK")
    controller.stop()
    assert refused(controller.port, controller.hostname)
    # A controller can be started again.
    controller.start()
    with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
        assert client.noop() == (250, b"OK")
    controller.stop()


def test_default_hostname_is_loopback(handler: Any) -> None:
    controller = Controller(handler, port=0, ready_timeout=10)
    assert controller.hostname == get_localhost()
    assert controller.hostname in ("::1", "127.0.0.1")
    controller.start()
    try:
        with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
            assert client.ehlo("me")[0] == 250
    finally:
        controller.stop()


def test_double_start_and_stop_assert(handler: Any) -> None:
    controller = Controller(handler, hostname="127.0.0.1", port=0, ready_timeout=10)
    with pytest.raises(AssertionError):
        controller.stop()
    controller.start()
    try:
        with pytest.raises(AssertionError):
            controller.start()
    finally:
        controller.stop()


def test_ready_timeout_env_overrides(monkeypatch: pytest.MonkeyPatch, handler: Any) -> None:
    monkeypatch.setenv("AIOSMTPD_CONTROLLER_TIMEOUT", "7.5")
    assert Controller(handler, ready_timeout=1.0).ready_timeout == 7.5


def test_factory_error_surfaces_in_start(handler: Any) -> None:
    class Failing(Controller):
        def factory(self) -> SMTP:
            raise RuntimeError("factory is broken")

    controller = Failing(handler, hostname="127.0.0.1", port=0, ready_timeout=10)
    with pytest.raises(RuntimeError, match="factory is broken"):
        controller.start()
    controller.stop(no_assert=True)


def test_bind_error_surfaces_in_start(handler: Any) -> None:
    with taken_port() as port:
        controller = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=10)
        with pytest.raises(OSError):
            controller.start()


def test_server_kwargs_and_server_hostname(handler: Any) -> None:
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=0,
        ready_timeout=10,
        server_hostname="named.test",
        server_kwargs={"data_size_limit": 1234},
    )
    controller.start()
    try:
        with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
            _, banner = client.ehlo("me")
        assert banner.decode().splitlines()[:2] == ["named.test", "SIZE 1234"]
        assert b"SMTPUTF8" in banner  # the Controller's default
    finally:
        controller.stop()


class GatedHandler:
    """handle_DATA waits until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.delivered: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.entered.set()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.gate.wait, 30)
        self.delivered.append(envelope.content)
        return "250 delivered"


def test_stop_drains_in_flight_and_says_421_to_idle() -> None:
    gated = GatedHandler()
    controller = Controller(gated, hostname="127.0.0.1", port=0, ready_timeout=10)
    controller.start()
    idle, busy = SMTPClient.of(controller, timeout=10), SMTPClient.of(controller, timeout=10)
    assert idle.reply().startswith("220 ")
    assert busy.reply().startswith("220 ")
    busy.send(b"HELO me\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    assert codes([busy.reply() for _ in range(4)]) == [250, 250, 250, 354]
    busy.send(b"in flight\r\n.\r\n")
    assert gated.entered.wait(10)

    stopper = threading.Thread(target=controller.stop)
    stopper.start()
    # The idle session is told at once; the busy one still waits for its handler.
    assert idle.reply() == "421 4.3.2 Service shutting down\r\n"
    assert idle.reply() == ""  # closed
    gated.gate.set()
    assert busy.reply() == "250 delivered\r\n"
    assert busy.reply() == "421 4.3.2 Service shutting down\r\n"
    stopper.join(30)
    assert not stopper.is_alive()
    assert gated.delivered == [b"in flight\r\n"]
    for client in (idle, busy):
        client.close()


def test_stop_aborts_stragglers_after_drain_timeout() -> None:
    gated = GatedHandler()
    controller = Controller(
        gated, hostname="127.0.0.1", port=0, ready_timeout=10, drain_timeout=0.5
    )
    controller.start()
    with SMTPClient.of(controller, timeout=10, greeting=True) as busy:
        busy.send(b"HELO me\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n")
        assert gated.entered.wait(10)
        controller.stop()
        # Aborted: the client never sees a 250 for a message the handler has not finished.
        assert b"250 delivered" not in busy.read_to_close()
    gated.gate.set()


def test_unix_socket_controller(tmp_path: Path, handler: Any) -> None:
    path = tmp_path / "smtp.sock"
    controller = UnixSocketController(handler, unix_socket=path, ready_timeout=10)
    controller.start()
    try:
        with SMTPClient.unix(path, timeout=10) as client:
            assert client.reply().startswith("220 ")
            client.send(b"HELO me\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
            assert codes([client.reply() for _ in range(4)]) == [250, 250, 250, 354]
            client.send(b"over unix\r\n.\r\nQUIT\r\n")
            assert client.reply() == "250 OK\r\n"
            assert client.reply() == "221 Bye\r\n"
    finally:
        controller.stop()
    assert handler.envelopes[0].content == b"over unix\r\n"


def test_unthreaded_controller(handler: Any) -> None:
    loop = asyncio.new_event_loop()
    controller = UnthreadedController(handler, hostname="127.0.0.1", port=0, loop=loop)
    controller.begin()
    try:

        def send() -> None:
            with smtplib.SMTP(controller.hostname, controller.port, timeout=10) as client:
                client.sendmail("a@b", ["c@d"], b"unthreaded\r\n")

        loop.run_until_complete(loop.run_in_executor(None, send))
    finally:
        controller.end()
        loop.close()
    assert handler.envelopes[0].content == b"unthreaded\r\n"
