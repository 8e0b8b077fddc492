"""Sans-I/O framing of the client's byte stream: command lines and DATA bodies.

Bytes go in with :meth:`Framer.feed`; :meth:`Framer.next_event` hands out, in order, the
complete command lines and DATA bodies found so far. No sockets, no clocks, no asyncio: the
same byte stream gives the same events however it is split into reads.

Rules (RFC 5321 and the smuggling advisories):

* A command line ends at LF; trailing CR/LF are stripped. A line longer than the command limit
  is discarded up to its LF and reported once as :class:`CommandTooLong`.
* DATA ends only at ``<CRLF>.<CRLF>`` (or ``.<CRLF>`` right after the 354). Bare CR or LF and
  every lookalike terminator are content.
* Dot-unstuffing removes the first ``.`` of a CRLF-delimited line, nowhere else.
* Over-long lines and over-size bodies are discarded as they arrive (memory stays bounded); the
  error is reported only once the real terminator has arrived.
* With ``spill`` (see :meth:`Framer.start_data`), a body is handed out in :class:`BodyPart`
  events as it arrives, at least ``spill`` octets each (complete lines, unstuffed), and the
  final :class:`Message` (or :class:`Chunk`) holds only the rest: the framer then never holds
  more than about ``spill`` octets of a body, however large.
"""

from __future__ import annotations

from enum import Enum
from typing import Final, NamedTuple

CRLF: Final = b"\r\n"
TERMINATOR: Final = b"\r\n.\r\n"
#: A DATA body that is empty: the dot line follows the 354 at once.
EMPTY_BODY: Final = b".\r\n"
#: Bytes kept when discarding DATA: enough to recognise a terminator split across reads.
_TAIL: Final = len(TERMINATOR) - 1


class Command(NamedTuple):
    """A complete command line, without its line ending (a tuple: cheap to build)."""

    line: bytes


class CommandTooLong(NamedTuple):
    """A command line longer than the framer's limit was received and dropped."""


_TOO_LONG: Final = CommandTooLong()


class Chunk(NamedTuple):
    """The octets of one BDAT chunk (empty when the chunk was discarded), and its size."""

    data: bytes
    size: int


class BodyPart(NamedTuple):
    """Content of the body (or BDAT chunk) being received, handed out before its end."""

    data: bytes


class DataError(Enum):
    """Why a DATA body was refused."""

    LINE_TOO_LONG = "line too long"
    TOO_MUCH_DATA = "too much data"


class Message(NamedTuple):
    """A complete, unstuffed DATA body (including the CRLF of its last line), or its error.

    ``size`` is the number of body octets received, as sent (before unstuffing). A tuple, as
    the other events: a frozen dataclass (one ``object.__setattr__`` per field) cost the worker
    ~6,000 instructions more per message.
    """

    content: bytes
    size: int
    error: DataError | None = None


Event = Command | CommandTooLong | Message | Chunk | BodyPart


class Framer:
    """Splits an SMTP client's byte stream into :data:`Event` objects."""

    __slots__ = (
        "_buf",
        "_chunk",
        "_chunk_keep",
        "_chunk_size",
        "_data_error",
        "_data_limit",
        "_data_received",
        "_in_data",
        "_line_checked",
        "_line_limit",
        "_pos",
        "_scan",
        "_skipping",
        "_spill",
        "_streamed",
        "chunk_left",
        "max_command_line",
    )

    def __init__(self, max_command_line: int = 512, line_limit: int = 1000) -> None:
        #: Longest command line accepted, without its line ending.
        self.max_command_line = max_command_line
        self._line_limit = line_limit
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed input in _buf
        self._scan = 0  # where the next search for a line end or terminator starts
        self._skipping = False  # discarding an over-long command line up to its LF
        self._in_data = False
        self._data_limit: int | None = None
        self._data_error: DataError | None = None
        self._data_received = 0  # octets of the body dropped while discarding
        self._line_checked = 0  # DATA: every line before this offset is within the limit
        #: BDAT: octets of the chunk still to come (None: not in a chunk).
        self.chunk_left: int | None = None
        self._chunk_size = 0
        self._chunk_keep = True
        self._chunk = bytearray()
        self._spill: int | None = None  # hand out BodyPart events past this many octets
        self._streamed = 0  # DATA: octets of the body (as sent) handed out in BodyParts

    # -- input ---------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the client."""
        self._buf += data

    def take_line(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """``data`` as one command line, when it is exactly that and nothing is buffered (the
        usual read of a client that waits for each reply); None otherwise, and then ``data``
        must be :meth:`feed` as usual. The line is what :meth:`next_event` would give."""
        if self._buf or self._skipping or self._in_data or self.chunk_left is not None:
            return None
        line = bytes(data)
        end = line.find(b"\n")
        if end < 0 or end != len(line) - 1 or end > self.max_command_line + 1:
            return None  # several lines, a partial one, or one for the long-line rules
        line = line[:end].rstrip(b"\r")
        return line if len(line) <= self.max_command_line else None

    @property
    def buffered(self) -> int:
        """Octets received but not yet handed out as events."""
        return len(self._buf) - self._pos

    @property
    def in_data(self) -> bool:
        """Receiving message content (a DATA body or a BDAT chunk), not commands."""
        return self._in_data or self.chunk_left is not None

    def take_buffered(self) -> bytes:
        """Remove and return all unconsumed input (e.g. to discard it before a TLS handshake)."""
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = self._scan = 0
        self._skipping = False
        return rest

    def start_data(self, size_limit: int | None, spill: int | None = None) -> None:
        """Switch to DATA mode: the next event is the :class:`Message` after the 354.

        With ``spill``, :class:`BodyPart` events come first whenever ``spill`` octets of the
        body are waiting; the Message then holds the rest of the body.
        """
        self._in_data = True
        self._data_limit = size_limit or None
        self._data_error = None
        self._data_received = 0
        self._streamed = 0
        self._spill = spill
        self._scan = self._pos
        self._line_checked = self._pos

    def start_chunk(self, size: int, keep: bool = True, spill: int | None = None) -> None:
        """Switch to BDAT mode: the next event is the :class:`Chunk` of ``size`` octets.

        With ``keep=False`` the octets are read and dropped (a refused chunk must still be
        consumed, or its content would be taken for commands). With ``spill``,
        :class:`BodyPart` events hand out the chunk's octets as they arrive; the Chunk then
        holds the rest.
        """
        self._spill = spill if keep else None
        self.chunk_left = size
        self._chunk_size = size
        self._chunk_keep = keep
        self._chunk = bytearray()

    # -- output --------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next complete event, or None until more bytes are fed."""
        if self._in_data:
            return self._next_message()
        if self.chunk_left is not None:
            return self._next_chunk()
        return self._next_command()

    def _next_chunk(self) -> Chunk | BodyPart | None:
        left = self.chunk_left
        assert left is not None
        take = min(left, len(self._buf) - self._pos)
        if take:
            if self._chunk_keep:
                self._chunk += memoryview(self._buf)[self._pos : self._pos + take]
            self._pos += take
            self._scan = self._pos
            self._compact()
            left -= take
        self.chunk_left = left
        if left:
            if self._spill is not None and len(self._chunk) >= self._spill:
                data = bytes(self._chunk)
                self._chunk = bytearray()
                return BodyPart(data)
            return None
        self.chunk_left = None
        data = bytes(self._chunk)
        self._chunk = bytearray()
        return Chunk(data, self._chunk_size)

    def _next_command(self) -> Command | CommandTooLong | None:
        buf = self._buf
        if not buf:
            return None  # everything was handed out (the usual state between reads)
        while True:
            end = buf.find(b"\n", self._scan)
            if end < 0:
                if len(buf) - self._pos > self.max_command_line + 2:
                    # Over-long: drop what we have, remember to drop the rest of the line.
                    self._skipping = True
                    self._consume_all()
                else:
                    self._scan = len(buf)
                return None
            start = self._pos
            self._pos = self._scan = end + 1
            if self._skipping:
                self._skipping = False
                self._compact()
                return _TOO_LONG
            too_long = end - start > self.max_command_line + 1  # one CR fits, as while reading
            while end > start and buf[end - 1] == 0x0D:
                end -= 1
            if too_long or end - start > self.max_command_line:
                self._compact()
                return _TOO_LONG
            line = bytes(buf[start:end])
            if self._pos == len(buf):
                buf.clear()
                self._pos = self._scan = 0
            elif self._pos > 65536:
                self._compact()
            return Command(line)

    def _next_message(self) -> Message | BodyPart | None:
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            return None  # nothing new (say, right after the 354): no event can be due
        at_start = self._data_error is None and not self._streamed
        if at_start and buf.startswith(EMPTY_BODY, pos):
            return self._finish_message(pos, pos, b"")
        if (
            at_start
            and len(buf) - pos < len(EMPTY_BODY)
            and (EMPTY_BODY.startswith(bytes(buf[pos:])))
        ):
            return None  # could still become an empty body
        end = buf.find(TERMINATOR, max(self._scan, pos))
        if end < 0:
            self._scan = max(pos, len(buf) - _TAIL)
            if self._data_error is None:
                # Up to 2 octets (".\r") may be the start of the terminator, not body.
                self._data_error = self._first_error(len(buf), len(buf) - 2, final=False)
            if self._data_error is not None:
                self._discard_body()
            elif self._spill is not None and len(buf) - pos >= self._spill:
                return self._body_part()
            return None
        body_end = end + 2  # the body keeps the CRLF of its last line
        if self._data_error is None:
            self._data_error = self._first_error(body_end, body_end, final=True)
        if self._data_error is not None:
            return self._finish_message(pos, body_end, b"")
        start = pos + 1 if buf[pos] == 0x2E else pos  # unstuff the first line (after a
        # BodyPart the rest starts with the CRLF that ends the part's last line)
        content = bytes(memoryview(buf)[start:body_end])
        if b"\r\n." in content:
            content = content.replace(b"\r\n.", b"\r\n")
        return self._finish_message(pos, body_end, content)

    def _body_part(self) -> BodyPart | None:
        """Hand out the complete, checked lines of the body received so far (unstuffed).

        The part ends before the CRLF of its last line: the rest of the body starts with that
        CRLF, so a terminator or a stuffed dot at the boundary is recognised in the rest, and
        the first line of the body is the only one unstuffed at its very start.
        """
        buf = self._buf
        pos = self._pos
        cut = buf.rfind(CRLF, pos, self._line_checked)
        if cut <= pos:
            return None  # no complete line yet (the line length limit bounds this)
        start = pos + 1 if not self._streamed and buf[pos] == 0x2E else pos
        data = bytes(memoryview(buf)[start:cut])
        if b"\r\n." in data:
            data = data.replace(b"\r\n.", b"\r\n")
        self._streamed += cut - pos
        del buf[:cut]
        self._pos = 0
        self._scan = max(0, self._scan - cut)
        self._line_checked -= cut
        return BodyPart(data)

    # -- helpers -------------------------------------------------------------------------

    def _first_error(self, upto: int, body_upto: int, final: bool) -> DataError | None:
        """The error the body shows first in stream order, looking at octets before ``upto``.

        Both checks report the offset at which the error became certain, so the answer does
        not depend on how the stream was split into reads.
        """
        line_at = self._long_line_at(upto, final)
        limit = self._data_limit
        origin = self._pos - self._streamed  # where the body would start, had none been handed out
        if line_at is not None:
            # The octets before line_at are all body: past the size limit, that came first.
            if limit is not None and origin + limit + 1 < line_at:
                return DataError.TOO_MUCH_DATA
            return DataError.LINE_TOO_LONG
        if limit is not None and body_upto - origin > limit:
            return DataError.TOO_MUCH_DATA
        return None

    def _long_line_at(self, upto: int, final: bool) -> int | None:
        """Where a DATA line is known to exceed the limit (a stuffing dot does not count)."""
        buf = self._buf
        limit = self._line_limit
        p = self._line_checked
        while upto - p > limit + 2:
            window = p + limit + 2 + (1 if buf[p] == 0x2E else 0)
            last = buf.rfind(CRLF, p, window)
            if last < 0:
                if not final and window > len(buf):
                    break  # this line may still end in time
                return window
            p = last + 2
        self._line_checked = p
        return None

    def _discard_body(self) -> None:
        """Drop a refused body's bytes, keeping a tail that may start the terminator."""
        keep_from = max(self._pos, len(self._buf) - _TAIL)
        self._data_received += keep_from - self._pos
        del self._buf[:keep_from]
        self._pos = 0
        self._scan = 0
        self._line_checked = 0

    def _finish_message(self, start: int, body_end: int, content: bytes) -> Message:
        size = self._data_received + self._streamed + (body_end - start)
        error = self._data_error
        self._pos = self._scan = body_end + len(EMPTY_BODY)
        self._in_data = False
        self._data_error = None
        self._data_received = 0
        self._streamed = 0
        self._spill = None
        self._compact()
        return Message(content, size, error)

    def _consume_all(self) -> None:
        self._buf.clear()
        self._pos = self._scan = 0

    def _compact(self) -> None:
        if self._pos >= len(self._buf):
            self._buf.clear()
            self._pos = self._scan = 0
        elif self._pos > 65536:
            del self._buf[: self._pos]
            self._scan -= self._pos
            self._pos = 0
