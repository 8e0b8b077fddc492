"""Helpers for the relay tests (no tests here): Postfix's ``smtp-sink`` as a next hop, scripted
fake next hops, a connection-counting TCP proxy, relays served by a Controller and closed at the
end, and an SMTP client that records each step's reply.

Every process and thread a helper starts is stopped by the test that made it (fixtures in each
test module); ports are free loopback ports chosen at run time; waits are bounded polls.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import smtplib
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from farm.controller import Controller
from farm.relay import Relay
from tests.support.net import free_port, listening
from tests.support.processes import stop_process
from tests.support.wait import WAIT, wait_for

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SWAKS = shutil.which("swaks")
HAVE_SINK = os.path.exists(SMTP_SINK)

DOMAIN = "farm.test"


class Sink:
    """One running ``smtp-sink``; ``dump`` collects every transaction it received."""

    def __init__(self, args: list[str], directory: Path, port: int | None = None) -> None:
        self.args = args
        self.port = port or free_port()
        self.dump = directory / f"dump-{self.port}-{time.monotonic_ns()}"
        command = [SMTP_SINK, "-h", "sink.test", "-D", str(self.dump), *args]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
        command += [f"127.0.0.1:{self.port}", "16"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"smtp-sink exited: {self.process.stderr.read()!r}")  # type: ignore[union-attr]
            return listening(self.port)

        wait_for(up, "smtp-sink listening")

    @property
    def next_hop(self) -> str:
        return f"127.0.0.1:{self.port}"

    def text(self) -> bytes:
        return self.dump.read_bytes() if self.dump.exists() else b""

    def count(self, marker: bytes) -> int:
        return self.text().count(marker)

    def wait_for(self, marker: bytes, count: int = 1) -> bytes:
        """The dump once it holds ``marker`` ``count`` times (the sink writes it on ``.``)."""
        try:
            return wait_for(lambda: self.text() if self.count(marker) >= count else b"", "dump")
        except AssertionError:
            raise AssertionError(f"{marker!r} x{count} never reached the next hop") from None

    def stop(self) -> None:
        stop_process(self.process, grace=5)
        if self.process.stderr is not None:
            self.process.stderr.close()


@contextmanager
def sinks() -> Iterator[Callable[..., Sink]]:
    """``start(*smtp_sink_options, port=None)`` -> a started ``Sink``; all stopped at the end."""
    started: list[Sink] = []
    # Not under tmp_path: smtp-sink drops to ``nobody``, which cannot enter pytest's 0700 dirs.
    directory = Path(tempfile.mkdtemp(prefix="farm-relay-sink-"))
    directory.chmod(0o1777)

    def start(*args: str, port: int | None = None) -> Sink:
        instance = Sink(list(args), directory, port)
        started.append(instance)
        return instance

    try:
        yield start
    finally:
        for instance in started:
            instance.stop()
        shutil.rmtree(directory, ignore_errors=True)


class LoopThread:
    """An event loop in a daemon thread, for fake next hops and proxies."""

    def __init__(self) -> None:
        self.servers: list[asyncio.AbstractServer] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)  # type: ignore[arg-type]

    def stop(self) -> None:
        async def cancel_all() -> None:
            for server in self.servers:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "FakeNextHop"], Awaitable[None]]


@dataclass
class FakeNextHop:
    """A scripted next hop: ``script(reader, writer, hop)`` runs for each connection."""

    script: Script
    loop: LoopThread
    port: int = 0
    connections: int = 0
    lines: list[bytes] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    closed: int = 0
    server: Any = None

    def start(self) -> FakeNextHop:
        async def serve() -> None:
            async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                self.connections += 1
                try:
                    await self.script(reader, writer, self)
                except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
                    pass  # (a cancelled stream callback task makes asyncio log an error)
                finally:
                    writer.close()
                    self.closed += 1

            self.server = await asyncio.start_server(session, "127.0.0.1", 0)
            self.loop.servers.append(self.server)
            self.port = self.server.sockets[0].getsockname()[1]

        self.loop.run(serve())
        return self

    @property
    def next_hop(self) -> str:
        return f"127.0.0.1:{self.port}"


async def smtp_dialogue(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    hop: FakeNextHop,
    answer: Callable[[bytes, int], bytes | None] | None = None,
    ehlo: bytes = b"250-fake\r\n250 8BITMIME\r\n",
    *,
    pipelining: bool = False,
    chunking: bool = False,
    greet: bool = True,
) -> None:
    """A well-behaved next hop; ``answer(line, transaction_number)`` may override a reply
    (``b""``: close without replying).

    ``pipelining``: ``PIPELINING`` is offered, and insisted on: ``MAIL`` is answered only once
    the line after it has arrived, both replies in one write (a relay that waits for the
    ``MAIL``'s reply before its ``RCPT`` hangs). ``chunking``: ``CHUNKING`` is offered and
    ``BDAT <size> [LAST]`` takes exactly ``size`` bytes (the message is complete at ``LAST``).
    ``greet=False``: no ``220`` first (the dialogue goes on after a ``STARTTLS``).
    """
    extra = (b"250-PIPELINING\r\n" if pipelining else b"") + (
        b"250-CHUNKING\r\n" if chunking else b""
    )
    if extra:
        first, _, rest = ehlo.partition(b"\r\n")
        ehlo = first + b"\r\n" + extra + rest
    transactions = 0
    chunks = b""
    if greet:
        writer.write(b"220 fake ESMTP\r\n")

    def reply_to(line: bytes) -> bytes | None:
        """Our reply to a plain command line (None: close)."""
        reply = answer(line, transactions) if answer is not None else None
        if reply == b"":
            return None
        if reply is not None:
            return reply
        verb = line[:4].upper()
        if verb in (b"EHLO", b"LHLO"):
            return ehlo
        if verb == b"BDAT" and not chunking:
            return b"502 5.5.1 BDAT not offered\r\n"  # (its chunk is then read as commands)
        return b"221 bye\r\n" if verb == b"QUIT" else b"250 ok\r\n"

    while line := await reader.readline():
        hop.lines.append(line)
        verb = line[:4].upper()
        if verb == b"MAIL":
            transactions += 1
        if verb == b"DATA" and (answer is None or answer(line, transactions) is None):
            writer.write(b"354 go\r\n")
            body = b""
            while (chunk := await reader.readline()) not in (b".\r\n", b""):
                body += chunk
            hop.messages.append(body)
            writer.write(reply_to(b".\r\n") or b"")
        elif verb == b"BDAT" and chunking:
            size, *last = line.split()[1:]
            chunks += await reader.readexactly(int(size))
            if last:
                hop.messages.append(chunks)
                chunks = b""
            reply = reply_to(line)
            if reply is None:
                return
            writer.write(reply)
        elif verb == b"MAIL" and pipelining:
            following = await reader.readline()
            hop.lines.append(following)
            replies = [reply_to(line), reply_to(following)]
            if None in replies:
                return
            writer.write(b"".join(replies))  # type: ignore[arg-type]
        else:
            reply = reply_to(line)
            if reply is None:
                return
            writer.write(reply)
            if verb == b"QUIT":
                await writer.drain()
                return
        await writer.drain()


class CountingProxy:
    """A TCP proxy in front of a next hop: counts the connections it accepted and closed."""

    def __init__(self, loop: LoopThread, target_port: int) -> None:
        self.loop = loop
        self.target_port = target_port
        self.accepted = 0
        self.closed = 0
        self.port = 0
        #: Everything the relay sent, and each read from it (one entry per segment received).
        self.sent = bytearray()
        self.reads: list[bytes] = []

        async def serve() -> Any:
            return await asyncio.start_server(self._session, "127.0.0.1", 0)

        self.server = loop.run(serve())
        loop.servers.append(self.server)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def next_hop(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def open(self) -> int:
        return self.accepted - self.closed

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            self.closed += 1
            return

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool = False
        ) -> None:
            try:
                while data := await src.read(65536):
                    if record:
                        self.sent += data
                        self.reads.append(data)
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass  # stopping (a cancelled stream callback task makes asyncio log an error)
        finally:
            self.closed += 1


def make_relay(next_hop: str, **kwargs: Any) -> Relay:
    kwargs.setdefault("domains", [DOMAIN, ".sub.farm.test"])
    kwargs.setdefault("trusted_networks", ["10.0.0.0/8"])  # 127.0.0.1 is untrusted
    kwargs.setdefault("timeout", 5.0)
    return Relay(next_hop, **kwargs)


@contextmanager
def relay_servers(make_controller: Any) -> Iterator[Callable[..., Controller]]:
    """``serve(relay, **controller_kwargs)`` -> a started Controller; every relay is closed
    (``aclose`` in its loop) before the controllers stop."""
    served: list[tuple[Relay, Controller]] = []

    def serve(relay: Relay, **kwargs: Any) -> Controller:
        controller = make_controller(relay, **kwargs)
        served.append((relay, controller))
        return controller

    try:
        yield serve
    finally:
        for relay, controller in served:
            if controller._thread is not None:
                close_relay(relay, controller)


def close_relay(relay: Relay, controller: Controller) -> None:
    asyncio.run_coroutine_threadsafe(relay.aclose(), controller.loop).result(WAIT)


def pool_idle(relay: Relay) -> int:
    """Idle connections in all of the relay's pools (read from another thread: a snapshot)."""
    return sum(pool.idle for pool in list(relay._pools.values()))


def connections_to(port: int) -> int:
    """This process's TCP connections (open fds) to loopback ``port``."""
    return sum(
        1
        for conn in psutil.Process().net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == port
    )


def message(marker: str, body: str = "hello") -> bytes:
    return (
        f"From: a@ext.test\r\nTo: r@{DOMAIN}\r\nSubject: {marker}\r\n\r\n{body}\r\n{marker}\r\n"
    ).encode()


def send(port: int, rcpts: list[str], data: bytes, sender: str = "a@ext.test") -> Any:
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        return client.sendmail(sender, rcpts, data)


@dataclass
class Attempt:
    """What the client was told: each RCPT's reply, and the final reply (None: no DATA)."""

    rcpt: list[tuple[int, bytes]]
    final: tuple[int, bytes] | None

    @property
    def accepted(self) -> bool:
        return self.final is not None and self.final[0] == 250


def attempt(
    port: int, rcpts: list[str], data: bytes, client: smtplib.SMTP | None = None
) -> Attempt:
    """One transaction step by step; DATA only when a recipient was accepted."""

    def run(smtp: smtplib.SMTP) -> Attempt:
        smtp.ehlo_or_helo_if_needed()
        code, text = smtp.mail("a@ext.test")
        assert code == 250, (code, text)
        replies = [smtp.rcpt(rcpt) for rcpt in rcpts]
        if not any(code == 250 for code, _ in replies):
            smtp.rset()
            return Attempt(replies, None)
        try:
            return Attempt(replies, smtp.data(data))
        except smtplib.SMTPDataError as error:  # DATA itself refused
            return Attempt(replies, (error.smtp_code, error.smtp_error))

    if client is not None:
        return run(client)
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as smtp:
        smtp.ehlo("client.test")
        return run(smtp)


# -- fixtures (registered for every test module by tests/conftest.py) ---------------------------


@pytest.fixture
def sink() -> Iterator[Callable[..., Sink]]:
    """Factory: ``sink(*smtp_sink_options)`` -> a started ``Sink``; all stopped at teardown."""
    with sinks() as start:
        yield start


@pytest.fixture
def serve(make_controller: Any) -> Iterator[Callable[..., Controller]]:
    """Factory: ``serve(relay)`` -> a started Controller; the relay is closed at teardown."""
    with relay_servers(make_controller) as start:
        yield start


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    """An event loop in a thread for fake next hops and proxies; stopped at teardown."""
    thread = LoopThread()
    yield thread
    thread.stop()
