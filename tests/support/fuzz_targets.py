"""Fuzz targets (no tests here; ``tests/unit/test_fuzz.py`` drives them with hypothesis).

* :func:`run_framer`: a :class:`~farm.smtp.framing.Framer` under an arbitrary sequence of
  feeds, mode switches (``start_data``, ``start_chunk``) and ``take_buffered`` calls.
* :func:`run_engine`: the ``SMTP`` (or ``LMTP``) protocol object on a fake transport that
  applies real flow control (it pauses the protocol's writing past a high-water mark and obeys
  ``pause_reading``), fed an arbitrary byte stream in arbitrary pieces, with a handler that
  has hooks or none. No sockets: thousands of sessions a second.

Both return the invariant violations they found (an empty list: none); an exception escaping
the code under test propagates, and is a crash.
"""

from __future__ import annotations

import asyncio
import logging
import re
import selectors
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from farm.lmtp import LMTP
from farm.smtp import SMTP, AuthResult
from farm.smtp.framing import BodyPart, Chunk, Command, CommandTooLong, Framer, Message

# -- the framer ----------------------------------------------------------------------------------

#: ``("feed", bytes)``, ``("data", limit, spill)``, ``("chunk", size, keep, spill)``,
#: ``("take",)``.
FramerOp = tuple[Any, ...]


def run_framer(ops: Sequence[FramerOp], max_command: int, line_limit: int) -> list[str]:
    """Apply ``ops``, draining events after each; the invariants each event and state keep."""
    framer = Framer(max_command, line_limit)
    problems: list[str] = []
    data_limit: int | None = None
    spill: int | None = None
    streamed = 0  # octets handed out in BodyParts since the body or chunk began
    for op in ops:
        kind = op[0]
        if kind == "feed":
            framer.feed(op[1])
        elif kind == "data" and not framer.in_data:
            data_limit, spill, streamed = op[1], op[2], 0
            framer.start_data(data_limit, spill)
        elif kind == "chunk" and not framer.in_data:
            streamed = 0
            framer.start_chunk(op[1], keep=op[2], spill=op[3])
        elif kind == "take" and not framer.in_data:
            framer.take_buffered()
            if framer.buffered:
                problems.append("take_buffered left input behind")
        in_chunk = framer.in_data and framer.chunk_left is not None
        while (event := framer.next_event()) is not None:
            problems += _event_problems(event, max_command)
            if type(event) is BodyPart:
                streamed += len(event.data)
            elif type(event) is Chunk:
                if event.data and streamed + len(event.data) != event.size:
                    problems.append(f"a chunk of {event.size} gave {streamed}+{len(event.data)}")
                streamed = 0
        if framer.buffered < 0:
            problems.append(f"negative buffered {framer.buffered}")
        if in_chunk and framer.in_data and framer.buffered:
            problems.append("a chunk left input unread")
        if not framer.in_data and framer.buffered > max_command + 2:
            problems.append(f"{framer.buffered} octets held in command mode")
        if framer.in_data and not in_chunk:
            bound = min(b for b in (data_limit, spill, 1 << 62) if b)  # (0: no limit)
            if framer.buffered > bound + line_limit + 8:
                problems.append(
                    f"{framer.buffered} octets held (limit {data_limit}, spill {spill})"
                )
    return problems


def _event_problems(event: Any, max_command: int) -> list[str]:
    kind = type(event)
    if kind is Command:
        line = event.line
        if b"\n" in line or line.endswith(b"\r") or len(line) > max_command:
            return [f"bad command line {line[:60]!r}"]
    elif kind is Message:
        if event.error is None and event.size < len(event.content):
            return ["a message larger than the octets received"]
        if event.error is not None and event.content:
            return ["a refused message kept its content"]
    elif kind is Chunk:
        if len(event.data) > event.size:
            return ["a chunk larger than announced"]
    elif kind is BodyPart:
        if not event.data:
            return ["an empty body part"]
    elif kind is not CommandTooLong:
        return [f"unknown event {event!r}"]
    return []


# -- the engine ----------------------------------------------------------------------------------

_REPLY_LINE = re.compile(rb"[2-5][0-9]{2}(?:[ -][^\r\n]*)?")
#: The fake transport pauses the protocol's writing past this many unread octets.
HIGH_WATER = 2048


class FakeTransport(asyncio.Transport):
    """A transport that records what the protocol writes and applies flow control: writes past
    :data:`HIGH_WATER` unread octets pause the protocol, ``client_reads`` resumes it; input is
    only delivered while reading is not paused."""

    def __init__(self, protocol: Any, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.protocol = protocol
        self.loop = loop
        self.output = bytearray()
        self.unread = 0
        self.reading = True
        self.writing_paused = False
        self.closing = False
        self.lost = False
        self.problems: list[str] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.7", 40000), "sockname": ("192.0.2.25", 25)}.get(name, default)

    def write(self, data: Any) -> None:
        if self.lost:
            self.problems.append("write after the connection was lost")
            return
        if self.closing:
            self.problems.append("write after close")
        self.output += data
        self.unread += len(data)
        if self.unread > HIGH_WATER and not self.writing_paused:
            self.writing_paused = True
            self.protocol.pause_writing()

    def client_reads(self, count: int) -> None:
        self.unread = max(0, self.unread - count)
        if self.writing_paused and self.unread <= HIGH_WATER // 4 and not self.lost:
            self.writing_paused = False
            self.protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self.unread

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self._lose)

    def abort(self) -> None:
        self.close()

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)


class HookedHandler:
    """A handler with most hooks, some of them async, that checks what the engine gives it."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.messages = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        await asyncio.sleep(0)
        if address.startswith("x"):
            return "550 5.1.1 unknown user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(0)
        if envelope.mail_from is None or not envelope.rcpt_tos:
            self.problems.append("a message without a sender or recipients")
        self.messages += 1
        return "250 OK" if self.messages % 3 else "554 5.7.1 refused"

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        return "250 OK"

    def handle_VRFY(self, server: Any, session: Any, envelope: Any, address: str) -> str:
        return "252 maybe"


class PlainHandler:
    """Only ``handle_DATA``: every other command runs inline, without a task."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if envelope.mail_from is None or not envelope.rcpt_tos:
            self.problems.append("a message without a sender or recipients")
        return "250 OK"


def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
    return AuthResult(success=getattr(data, "password", b"") == b"secret")


@dataclass
class EngineCase:
    """One session: the engine's keywords, the handler kind, and what the client does."""

    kwargs: dict[str, Any]
    hooked: bool
    lmtp: bool
    #: ``("data", bytes)``, ``("read", n)``, ``("tick",)``, ``("eof",)``.
    ops: list[tuple[Any, ...]] = field(default_factory=list)
    #: A handler of one's own instead of the two built in (for the checks' own tests).
    handler: Any = None


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer instead of waiting for it: timeouts
    and error delays run at full speed. Nothing here does real I/O."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


class _JumpingSelector(selectors.SelectSelector):
    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise RuntimeError("the session waits for nothing: it would hang")
        self._loop.now += timeout
        return []


def run_engine(case: EngineCase) -> list[str]:
    """Run one session on a fresh event loop; the invariant violations seen."""
    loop = VirtualClockLoop()
    errors = _ErrorRecords()
    logger = logging.getLogger("farm")
    logger.addHandler(errors)
    loop_errors: list[str] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context["message"]))
    try:
        problems = loop.run_until_complete(_session(case, loop))
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        logger.removeHandler(errors)
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
    return problems + [f"logged: {m}" for m in errors.records] + loop_errors


async def _session(case: EngineCase, loop: asyncio.AbstractEventLoop) -> list[str]:
    handler: Any = case.handler or (HookedHandler() if case.hooked else PlainHandler())
    cls = LMTP if case.lmtp else SMTP
    # Built as a farm worker builds its sessions (replies held for the end of a loop pass).
    protocol = cls.protocol_factory(handler, loop=loop, authenticator=authenticate, **case.kwargs)()
    transport = FakeTransport(protocol, loop)
    protocol.connection_made(transport)
    pending = bytearray()  # sent by the client, not yet taken by a paused reader
    eof = sent_eof = False
    for op in case.ops:
        if transport.lost:
            break
        if op[0] == "data" and not eof:
            pending += op[1]
        elif op[0] == "read":
            transport.client_reads(op[1])
        elif op[0] == "eof":
            eof = True
        await _deliver(protocol, transport, pending)
        if eof and not sent_eof and not pending and not transport.lost:
            sent_eof = True
            protocol.eof_received()
        await asyncio.sleep(0)
    # The client reads everything and stops sending; the session must end or go idle.
    for _ in range(200):
        if transport.lost:
            break
        transport.client_reads(len(transport.output))
        await _deliver(protocol, transport, pending)
        if protocol._task is None and not pending:
            break
        await asyncio.sleep(0.01 if protocol._task is not None else 0)
    if not transport.lost:
        transport.close()
        await asyncio.sleep(0)
    problems = list(getattr(handler, "problems", []))
    await asyncio.sleep(0)  # (handle_CLOSE and the like)
    budget = case.kwargs.get("body_budget")
    if budget is not None and budget.used:
        problems.append(f"{budget.used} octets of body memory still counted after the session")
    return _output_problems(bytes(transport.output)) + transport.problems + problems


async def _deliver(protocol: Any, transport: FakeTransport, pending: bytearray) -> None:
    """Hand pending input to the protocol while it reads, in reads of at most 4 KiB."""
    while pending and transport.reading and not transport.lost:
        piece = bytes(pending[:4096])
        del pending[:4096]
        protocol.data_received(piece)


def _output_problems(output: bytes) -> list[str]:
    if not output:
        return []
    if not output.endswith(b"\r\n"):
        return [f"output does not end with CRLF: {output[-60:]!r}"]
    problems = []
    continued = None
    for line in output[:-2].split(b"\r\n"):
        if not _REPLY_LINE.fullmatch(line):
            problems.append(f"not a reply line: {line[:80]!r}")
            continue
        if continued is not None and line[:3] != continued:
            problems.append(f"code changes inside a multi-line reply: {line[:80]!r}")
        continued = line[:3] if line[3:4] == b"-" else None
    return problems
