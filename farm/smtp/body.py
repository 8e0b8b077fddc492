"""Message bodies as received: in memory while small, past a threshold in an unlinked file.

The engine builds one :class:`Body` per message as the DATA (or BDAT) octets arrive and hands it
to the handler as ``envelope.body``. Code that can stream (the relay, the Maildir handler, a
content scanner, a DKIM verifier) reads it in chunks and never holds the whole message::

    body = envelope_body(envelope)   # envelope.body, or the content a handler replaced
    body.size                        # octets (unstuffed, line ends as sent)
    for chunk in body.chunks():      # bytes, in order, CHUNK_SIZE at most each
        ...
    with body.open() as stream:      # a binary file object of its own (independent offset)
        stream.readline()
    body.copy_to(fd)                 # into an open file (sendfile(2) when spooled)

``body.read_all()`` (what ``envelope.content`` uses, on first access) returns the whole body as
one ``bytes``; for a spooled body that allocates ``size`` octets, counted in the process's
:class:`MemoryBudget` and refused with :class:`BodyMemoryExceeded` past it.

Spooled bodies live in ``spool_directory`` (default: the system's temporary directory) as files
created with ``O_TMPFILE``: never linked into the directory, so nothing is left behind when a
worker dies, and the space is freed as soon as the body is closed or garbage-collected. Put
that directory on a disk, not on a tmpfs (a tmpfs holds its files in memory).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from farm.smtp.settings import DEFAULTS

__all__ = [
    "CHUNK_SIZE",
    "INSUFFICIENT_STORAGE",
    "SPOOL_THRESHOLD_DEFAULT",
    "Body",
    "BodyMemoryExceeded",
    "MemoryBudget",
    "envelope_body",
]

#: Bodies larger than this (octets) go to a spool file (aiosmtpd-style handlers still get
#: ``envelope.content``, read on first use).
SPOOL_THRESHOLD_DEFAULT = DEFAULTS.spool_threshold
#: Largest chunk :meth:`Body.chunks` yields, and what the framer hands over at a time.
CHUNK_SIZE = 256 * 1024
#: The reply when a body cannot be held: memory budget exhausted, spool write failed.
INSUFFICIENT_STORAGE = "452 4.3.1 Insufficient system storage"


class BodyMemoryExceeded(Exception):
    """Holding a whole body in memory would exceed the process's :class:`MemoryBudget`."""


class MemoryBudget:
    """Octets of message bodies one process holds in memory at once (``limit`` 0: no limit).

    Counted: bodies kept in memory (each at most the spool threshold) and whole copies of
    spooled bodies made by :meth:`Body.read_all`, for as long as the body lives. A body that
    does not fit goes to its spool file instead; :meth:`exhausted` tells the engine to refuse
    a new message with ``452 4.3.1``.
    """

    def __init__(self, limit: int = 0) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit!r}")
        self.limit = limit
        self.used = 0
        #: The most ever used at once.
        self.peak = 0

    def exhausted(self) -> bool:
        return bool(self.limit) and self.used >= self.limit

    def try_take(self, octets: int) -> bool:
        """Count ``octets`` if they fit in the limit; False (nothing counted) otherwise."""
        if self.limit and self.used + octets > self.limit:
            return False
        self.take(octets)
        return True

    def take(self, octets: int) -> None:
        """Count ``octets`` that are held already (whether they fit or not)."""
        self.used += octets
        if self.used > self.peak:
            self.peak = self.used

    def give(self, octets: int) -> None:
        self.used -= octets


class Body:
    """One message body, written once (by the engine), then read any number of times.

    ``threshold``: past this many octets the body moves to a spool file in ``directory``
    (``None``: never). ``budget``: the :class:`MemoryBudget` the memory it holds counts in; a
    body that would exceed it is spooled at once. Writing never raises: an I/O error is kept
    in :attr:`error` (the engine answers ``452 4.3.1``) and later writes are dropped.
    """

    _file: BinaryIO | None = None
    _whole: bytes | None = None
    _counted = 0
    _closed = False
    _budget: MemoryBudget | None = None
    #: The I/O error that made the spool file unusable, if any.
    error: OSError | None = None

    def __init__(
        self,
        threshold: int | None = SPOOL_THRESHOLD_DEFAULT,
        directory: str | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.threshold = threshold
        self.directory = directory
        self._budget = budget
        #: Octets written.
        self.size = 0
        #: Whether every octet is ASCII (checked as they are written).
        self.ascii = True
        self._parts: list[bytes] = []  # in memory, until joined or spooled

    @classmethod
    def from_bytes(cls, data: bytes, budget: MemoryBudget | None = None) -> Body:
        """A body held in memory (never spooled), e.g. content a handler replaced."""
        body = cls(threshold=None, budget=budget)
        body.write(bytes(data))
        return body

    @property
    def spooled(self) -> bool:
        """Whether the body is in a spool file (rather than in memory)."""
        return self._file is not None

    # -- memory accounting -------------------------------------------------------------------

    def _count(self, octets: int, *, must_fit: bool) -> bool:
        budget = self._budget
        if budget is not None:
            # MemoryBudget.try_take/take, inline (once per body part).
            used = budget.used + octets
            if must_fit and budget.limit and used > budget.limit:
                return False
            budget.used = used
            if used > budget.peak:
                budget.peak = used
        self._counted += octets
        return True

    def _uncount(self, octets: int) -> None:
        if self._budget is not None:
            self._budget.give(octets)
        self._counted -= octets

    # -- writing (the engine) ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Append ``data``."""
        if not data or self._closed:
            return
        if self.ascii and not data.isascii():
            self.ascii = False
        self.size += len(data)
        if self._file is None and self.error is None:
            threshold = self.threshold
            if (threshold is None or self.size <= threshold) and self._count(
                len(data), must_fit=threshold is not None
            ):
                self._parts.append(data)
                return
            self._spool()
        if self.error is None:
            self._write_file(data)

    def _spool(self) -> None:
        """Move what is in memory to a new spool file (on failure: :attr:`error`)."""
        try:
            # Closed by close() or when the body is collected; O_TMPFILE: never in the directory.
            self._file = tempfile.TemporaryFile(  # noqa: SIM115
                buffering=0, dir=self.directory, prefix="farm-"
            )
        except OSError as error:
            self._fail(error)
            return
        parts, self._parts = self._parts, []
        self._uncount(self._counted)
        for part in parts:
            self._write_file(part)

    def _write_file(self, data: bytes) -> None:
        file = self._file
        assert file is not None  # written to only once spooling opened it
        fd = file.fileno()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as error:
            self._fail(error)

    def _fail(self, error: OSError) -> None:
        self.error = error
        self._release()

    # -- reading -----------------------------------------------------------------------------

    def read_all(self) -> bytes:
        """The whole body as one ``bytes`` (made once, then kept while the body lives).

        Raises :class:`BodyMemoryExceeded` when a spooled body does not fit in the budget,
        ``OSError`` when the spool file cannot be read.
        """
        self._check_readable()
        if self._whole is not None:
            return self._whole
        if self._file is None:
            parts = self._parts
            self._whole = parts[0] if len(parts) == 1 else b"".join(parts)
            self._parts = [self._whole] if self._whole else []
            return self._whole
        if not self._count(self.size, must_fit=True):
            budget = self._budget
            assert budget is not None  # only a budget makes a body not fit
            raise BodyMemoryExceeded(
                f"a {self.size}-octet body does not fit in the memory budget "
                f"({budget.used}/{budget.limit} octets in use)"
            )
        try:
            self._whole = self._pread_all(self._file.fileno())
        except BaseException:
            self._uncount(self.size)
            raise
        return self._whole

    def _pread_all(self, fd: int) -> bytes:
        data = os.pread(fd, self.size, 0)
        if len(data) == self.size:
            return data
        pieces = [data]
        offset = len(data)
        while offset < self.size:
            piece = os.pread(fd, self.size - offset, offset)
            if not piece:
                raise OSError(errno.EIO, "spool file shorter than the body")
            pieces.append(piece)
            offset += len(piece)
        return b"".join(pieces)

    def chunks(self, size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """The body in order, at most ``size`` octets at a time (never an empty chunk)."""
        self._check_readable()
        if self._file is None or self._whole is not None:
            data = self.read_all()
            if len(data) <= size:
                if data:
                    yield data
                return
            view = memoryview(data)
            for start in range(0, len(data), size):
                yield bytes(view[start : start + size])
            return
        fd = self._file.fileno()
        offset = 0
        while offset < self.size:
            piece = os.pread(fd, min(size, self.size - offset), offset)
            if not piece:
                raise OSError(errno.EIO, "spool file shorter than the body")
            offset += len(piece)
            yield piece

    def open(self) -> BinaryIO:
        """A new binary file object over the body, with its own position (close it after)."""
        self._check_readable()
        if self._file is None or self._whole is not None:
            return io.BytesIO(self.read_all())
        raw = _SpoolReader(self._file.fileno(), self.size, self)
        return io.BufferedReader(raw, CHUNK_SIZE)

    def endswith(self, suffix: bytes) -> bool:
        """Whether the body ends with ``suffix`` (reads only its last octets when spooled)."""
        self._check_readable()
        if len(suffix) > self.size:
            return False
        if self._file is None or self._whole is not None:
            return self.read_all().endswith(suffix)
        return os.pread(self._file.fileno(), len(suffix), self.size - len(suffix)) == suffix

    def copy_to(self, fd: int) -> None:
        """Write the whole body to the open file descriptor ``fd`` (at its current offset)."""
        self._check_readable()
        if self._file is not None and self._whole is None:
            offset = 0
            try:
                while offset < self.size:
                    sent = os.sendfile(fd, self._file.fileno(), offset, self.size - offset)
                    if not sent:
                        raise OSError(errno.EIO, "spool file shorter than the body")
                    offset += sent
                return
            except OSError as error:  # sendfile(2) refused for this pair of files: copy
                if error.errno not in (errno.EINVAL, errno.ENOSYS) or offset:
                    raise
        for chunk in self.chunks():
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]

    # -- the end -----------------------------------------------------------------------------

    def close(self) -> None:
        """Free the spool file and the memory counted; the body cannot be read any more."""
        self._closed = True
        self._release()

    def _release(self) -> None:
        self._parts = []
        self._whole = None
        if self._counted:
            self._uncount(self._counted)
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()

    def __del__(self) -> None:
        if self._file is None:
            # The usual end of a body kept in memory: give its octets back to the budget
            # (inline: this runs once per message).
            counted = self._counted
            if counted:
                self._counted = 0
                budget = self._budget
                if budget is not None:
                    budget.used -= counted
            return
        with contextlib.suppress(Exception):  # (at collection: nothing to report to)
            self._release()

    def _check_readable(self) -> None:
        if self._closed:
            raise ValueError("the body was closed")
        if self.error is not None:
            raise OSError(self.error.errno, f"the body could not be kept: {self.error}")

    def __repr__(self) -> str:
        where = "spooled" if self.spooled else "in memory"
        return f"<Body {self.size} octets {where}>"


class _SpoolReader(io.RawIOBase):
    """Reads a spool file with ``pread`` from its own offset (readers never disturb each other).

    Holds a reference to its :class:`Body` so the file stays open while it is read.
    """

    def __init__(self, fd: int, size: int, body: Body) -> None:
        self._fd = fd
        self._size = size
        self._offset = 0
        self._body = body

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._offset, io.SEEK_END: self._size}[whence]
        self._offset = max(0, base + offset)
        return self._offset

    def tell(self) -> int:
        return self._offset

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._offset)
        if want <= 0:
            return 0
        count = os.preadv(self._fd, [view[:want]], self._offset)
        self._offset += count
        return count


def envelope_body(envelope: Any) -> Body:
    """The body to stream for ``envelope``: ``envelope.body`` as received, unless a handler
    replaced ``original_content`` (or the envelope came from elsewhere, with only
    ``content``): then that content, in memory."""
    body: Body | None = getattr(envelope, "body", None)
    if body is not None and not getattr(envelope, "original_content_replaced", False):
        return body
    content = envelope.original_content
    if content is None:
        content = envelope.content
    if isinstance(content, str):
        content = content.encode("utf-8", "surrogateescape")
    return Body.from_bytes(bytes(content or b""))
