"""Logging for ``farm serve``: standard ``logging``, cheap per record, written in batches.

Every record is one line (``text``: ``2026-12-05 14:07:32,123 INFO [4242] farm.smtp: ...``, or
``json``: one object per line with the same fields). What keeps it cheap at one line per
message: the timestamp text is computed once per second, the process id once per process,
caller lookup is off (``logging._srcfile = None``, as the logging HOWTO's "Optimization"
section suggests), and :class:`LogWriter` writes in batches. A record's message is escaped
so that it stays on its line (CR, LF, U+2028... become ``\\r``, ``\\n``, ``\\u2028``), and the
lines of a traceback are indented, so nothing a client sends can start a record of its own.

Where lines go: file descriptor 2. With ``log_file``, fd 2 itself is pointed at the file, so
workers, ``faulthandler``'s stack dumps and anything a handler prints land in the same file;
SIGUSR1 points it at the file again (:func:`reopen_log_file`, after logrotate moved it).

Batches: the supervisor writes each line at once (it logs little, and must lose nothing). A
worker queues lines and writes them out at most :data:`FLUSH_INTERVAL` seconds after the first
one was logged, formatting the batch in one go; :func:`stop_batching` writes what is left when
the worker exits, crashes or is stopped. Only a SIGKILL (or a crash of the interpreter itself)
can lose the last fraction of a second of lines. Who writes: with a log file (fd 2 a regular
file, or ``/dev/null``), a timer of the worker's event loop, since such a write only copies to
the page cache (measured: the INFO log costs a third of what it cost with a flusher thread,
whose wake-ups and GIL hand-offs slowed the event loop); to a pipe or a socket (journald), a
flusher thread, so that a reader that stalls never blocks the event loop: past
:data:`MAX_BUFFERED_LINES` new lines are dropped and counted, and the count is logged once
writing works again.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import stat
import sys
import threading
import time
from typing import Any, Final

from farm.smtp.logline import (
    Fields,
    LineBatch,
    MessageLine,
    SessionLine,
    handle_info,
    printable,
    reaches_only,
    set_direct_route,
)

__all__ = [
    "FLUSH_INTERVAL",
    "FORMATS",
    "JSONFormatter",
    "LogFileError",
    "LogWriter",
    "TextFormatter",
    "configure_logging",
    "flush_logs",
    "open_log_file",
    "reopen_log_file",
    "start_batching",
    "stop_batching",
]

FORMATS: Final = ("text", "json")
#: A buffered line is written at most this many seconds after it was logged.
FLUSH_INTERVAL: Final = 0.1
#: Lines a worker may hold unwritten (about 8 MiB); lines beyond are dropped (and counted).
MAX_BUFFERED_LINES: Final = 40_000

log = logging.getLogger("farm.logs")

_pid = os.getpid()


def _new_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_new_pid)


class LogFileError(Exception):
    """The log file cannot be opened safely; ``str()`` is one line."""


# -- formatting -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _second(second: int) -> tuple[str, str, str]:
    """The texts of one second (computed once per second, safe from any thread): local
    ``2026-12-05 14:07:32``, the same in ISO 8601 form, and the UTC offset (``+01:00``)."""
    local = time.localtime(second)
    text = time.strftime("%Y-%m-%d %H:%M:%S", local)
    offset = time.strftime("%z", local)  # +0100
    return text, text.replace(" ", "T"), f"{offset[:3]}:{offset[3:]}" if len(offset) == 5 else "Z"


#: ``",000"`` to ``",999"``: the milliseconds of a text timestamp, formatted once.
_MILLIS: Final = tuple(f",{ms:03d}" for ms in range(1000))


class TextFormatter(logging.Formatter):
    """``DATE TIME,mmm LEVEL [PID] LOGGER: MESSAGE``, one line per record.

    A traceback follows on lines of its own, each indented by four spaces.
    """

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        second = int(created)
        message = record.getMessage()
        if not message.isprintable():
            message = printable(message)
        line = (
            f"{_second(second)[0]},{int((created - second) * 1000):03d} {record.levelname} "
            f"[{_pid}] {record.name}: {message}"
        )
        if record.exc_info or record.exc_text or record.stack_info:
            extra = _exception_text(self, record)
            line += "\n" + "\n".join("    " + part for part in extra.splitlines())
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``pid``, ``logger``, then the message's
    fields (a :class:`~farm.smtp.logline.Fields` message: ``event`` and its fields; any other:
    ``message``), and ``exception`` with the traceback if there is one. Non-ASCII characters
    are escaped (``\\u2028`` included), so a line is always one line."""

    def __init__(self) -> None:
        super().__init__()
        self._encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=str)

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        second = int(created)
        _, iso, offset = _second(second)
        data: dict[str, Any] = {
            "time": f"{iso}.{int((created - second) * 1000):03d}{offset}",
            "level": record.levelname,
            "pid": _pid,
            "logger": record.name,
        }
        message = record.msg
        if isinstance(message, Fields) and not record.args:
            data.update(message.as_dict())
        else:
            data["message"] = record.getMessage()
        extra = _exception_text(self, record)
        if extra:
            data["exception"] = extra
        return self._encode.encode(data)


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    text = ""
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        text = record.exc_text
    if record.stack_info:
        text = (text + "\n" if text else "") + formatter.formatStack(record.stack_info)
    return text


# -- writing ----------------------------------------------------------------------------------


class _Line:
    """What the formatters read of an INFO line queued by :meth:`LogWriter.emit_direct`."""

    __slots__ = ("created", "msg", "name")
    levelname = "INFO"
    levelno = logging.INFO
    args = ()
    exc_info = None
    exc_text = None
    stack_info = None

    def __init__(self, name: str, msg: Any, created: float) -> None:
        self.name = name
        self.msg = msg
        self.created = created

    def getMessage(self) -> str:  # (logging's name)
        return str(self.msg)


class LogWriter(logging.Handler):
    """Writes formatted records to a file descriptor: at once, or in batches once
    :meth:`start_batching` started its flusher thread (see the module docstring).

    While batching, a line is queued on a :class:`~farm.smtp.logline.LineBatch` (whose
    protocol says how a batch begins and ends without a lock): a formatted record (``str``),
    or a direct line (``(time, logger, line, values)``, formatted by the flusher).
    """

    def __init__(self, fd: int = 2) -> None:
        super().__init__()
        self.fd = fd
        self._batch = LineBatch(self._schedule, MAX_BUFFERED_LINES)
        self._flusher_thread: threading.Thread | None = None
        #: Loop mode: the event loop whose timer flushes, and its thread's id.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._batching = False
        #: Whether ``log_fields`` hands this writer its lines directly (:meth:`route_direct`).
        self._direct = False
        self._wake = threading.Event()
        self._stopping = False
        #: Held while taking and writing lines, so that they go out in order whoever
        #: flushes (never the handler's own lock, which a caller may hold).
        self._write_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if not self._batching:
            self._write([line])  # under the handler's lock, like every emit()
        else:
            self._batch.add(line)

    def emit_direct(self, logger: logging.Logger, message: Any, created: float) -> None:
        """An INFO line of ``logger`` that would reach this handler alone (see
        ``farm.smtp.logline.log_fields``), its message made of immutable fields.

        While batching, ``log_fields`` queues its lines on the batch itself (formatted by the
        flusher, a batch at a time: formatting a thousand lines in a row costs a fraction of
        formatting each one between two SMTP replies, since everything it touches stays in
        the CPU's caches; whether each logger still reaches this handler alone is checked
        then, once per batch, in :meth:`_texts`); this queues the same way."""
        if not self._batching:
            if not reaches_only(logger, self):  # (batching just stopped: check it here)
                handle_info(logger, message, created)
                return
            with self.lock:  # type: ignore[union-attr]
                self._write([self._text((created, logger, message, None))])
            return
        self._batch.add((created, logger, message, None))

    def _schedule(self) -> None:
        """Have the batch just begun written within FLUSH_INTERVAL."""
        loop = self._loop
        if loop is None:
            self._wake.set()
            return
        try:
            if threading.get_ident() == self._loop_thread:
                loop.call_later(FLUSH_INTERVAL, self.flush)
            else:
                loop.call_soon_threadsafe(loop.call_later, FLUSH_INTERVAL, self.flush)
        except RuntimeError:  # the loop is closed: write now
            self.flush()

    def flush(self) -> None:
        """Write every queued line now (and hand those that must go through ``logging``
        after all to it, once the lock is released: this writer may be among their
        handlers)."""
        elsewhere: list[tuple[float, logging.Logger, Any, Any]] = []
        batch = self._batch
        with self._write_lock:
            batch.scheduled = False  # before taking the lines: see LineBatch
            queue = batch.lines
            lines = [queue.popleft() for _ in range(len(queue))]
            dropped, batch.dropped = batch.dropped, 0
            if dropped:
                lines.append(
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')},000 WARNING [{_pid}] farm.logs: "
                    f"{dropped} log line(s) dropped: the log could not be written fast enough"
                )
            if lines:
                texts = self._texts(lines, elsewhere)
                if texts:
                    self._write(texts)
        for created, logger, line, values in elsewhere:
            try:
                handle_info(logger, line if values is None else line(*values), created)
            except Exception:  # (a filter that raises): say so, lose nothing else
                with self._write_lock:
                    self._write([f"(a log line of {logger.name} could not be handled)"])

    def _texts(self, lines: list[Any], elsewhere: list[Any]) -> list[str]:
        """The lines as text: direct lines formatted here, in one loop for the text format.

        A direct line whose logger no longer reaches this handler alone (a handler or filter
        added since, on the way or on the root) goes to ``elsewhere`` instead, for
        ``logging``: whether it does is asked once per logger and batch."""
        routes: dict[logging.Logger, bool] = {}
        texts: list[str] = []
        append = texts.append
        if type(self.formatter) is not TextFormatter:
            for line in lines:
                if type(line) is str:
                    append(line)
                elif self._alone(routes, line[1]):
                    append(self._text(line))
                else:
                    elsewhere.append(line)
            return texts
        stamp_ms = -1
        head_logger: logging.Logger | None = None
        head = ""  # stamp + " INFO [pid] name: "
        for line in lines:
            if type(line) is str:
                append(line)
                continue
            created, logger, message, values = line
            if logger is not head_logger:  # another logger: its route, then its head
                if not self._alone(routes, logger):
                    elsewhere.append(line)
                    continue
                head_logger = logger
                stamp_ms = -1
            ms = int(created * 1000)
            if ms != stamp_ms:  # the head's text, once per millisecond
                stamp_ms = ms
                second, milli = divmod(ms, 1000)
                head = f"{_second(second)[0]}{_MILLIS[milli]} INFO [{_pid}] {logger.name}: "
            try:
                if values is not None:
                    # The engine's lines format themselves after the head (never unprintable;
                    # compiled, each is a direct call).
                    if message is MessageLine:
                        append(MessageLine.text(head, values))
                        continue
                    if message is SessionLine:
                        append(SessionLine.text(head, values))
                        continue
                    message = message(*values)
                text = str(message)
                if not getattr(message, "always_printable", False) and not text.isprintable():
                    text = printable(text)
            except Exception:  # a message that cannot render: say so, lose nothing else
                append(f"(a log line of {logger.name} could not be formatted)")
                continue
            append(head + text)
        return texts

    def _alone(self, routes: dict[logging.Logger, bool], logger: logging.Logger) -> bool:
        """Whether ``logger``'s INFO lines reach this handler alone (asked once per batch)."""
        alone = routes.get(logger)
        if alone is None:
            alone = routes[logger] = reaches_only(logger, self)
        return alone

    def _text(self, line: tuple[float, logging.Logger, Any, Any]) -> str:
        created, logger, message, values = line
        try:
            if values is not None:
                message = message(*values)
            return self.format(_Line(logger.name, message, created))  # type: ignore[arg-type]
        except Exception:  # a message that cannot render: say so, lose nothing else
            return f"(a log line of {logger.name} could not be formatted)"

    def _write(self, lines: list[str]) -> None:
        data = ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
        except OSError:
            self._batch.dropped += len(lines)  # reported with the next lines that can be written

    def start_batching(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Queue lines from now on, written every FLUSH_INTERVAL: by a timer of ``loop`` (to
        be called from the thread that runs it) when the log is a file, else (or without a
        loop) by a daemon thread."""
        if self._batching:
            return
        if loop is not None and _is_file(self.fd):
            self._loop, self._loop_thread = loop, threading.get_ident()
            self._batching = True
            self._route_direct()
            return
        self._stopping = False
        thread = threading.Thread(target=self._run, name="farm-log-flusher", daemon=True)
        self._flusher_thread = thread
        self._batching = True  # before it runs: lines logged from now on are queued
        try:
            thread.start()
        except RuntimeError as error:  # no thread to spare (RLIMIT_NPROC, memory): unbatched
            self._flusher_thread = None
            self._batching = False
            logging.getLogger("farm.logs").warning(
                "log lines written one by one: cannot start the flusher thread (%s)", error
            )
        self._route_direct()

    def route_direct(self) -> None:
        """Take ``log_fields``' direct lines from now on (``configure_logging``'s writer)."""
        self._direct = True
        self._route_direct()

    def _route_direct(self) -> None:
        """Tell ``log_fields`` who checks the direct route: this writer per batch while it
        batches, ``log_fields`` per line otherwise."""
        if self._direct:
            set_direct_route(self, self.emit_direct, self._batch if self._batching else None)

    def stop_batching(self, timeout: float = 1.0) -> None:
        """Write what is queued and go back to writing each line at once."""
        thread = self._flusher_thread
        if thread is not None:
            self._stopping = True
            self._wake.set()
            if thread is not threading.current_thread():
                thread.join(timeout)
        self._batching = False
        self._route_direct()
        self._flusher_thread = None
        self._loop = None
        self.flush()

    def _run(self) -> None:
        wake = self._wake
        while True:
            wake.wait()
            if not self._stopping:
                time.sleep(FLUSH_INTERVAL)  # let the batch fill up
            wake.clear()
            self.flush()
            if self._stopping:
                return

    def close(self) -> None:
        self._direct = False  # (a writer replaced by configure_logging keeps off the route)
        self.stop_batching()
        super().close()


def _is_file(fd: int) -> bool:
    """Whether ``fd`` is a regular file or a character device other than a terminal
    (``/dev/null``): a write goes to the page cache (or nowhere) and cannot stall on a reader,
    so the event loop may do it."""
    try:
        mode = os.fstat(fd).st_mode
        return stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not os.isatty(fd))
    except OSError:
        return False


def _writer() -> LogWriter | None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogWriter):
            return handler
    return None


def start_batching(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """In a worker, from the thread that runs ``loop``: queue log lines, written in batches
    (see :meth:`LogWriter.start_batching`; no-op unless configure_logging ran)."""
    writer = _writer()
    if writer is not None:
        writer.start_batching(loop)


def stop_batching() -> None:
    """Write every buffered line now and stop buffering (a worker on its way out)."""
    writer = _writer()
    if writer is not None:
        writer.stop_batching()


def flush_logs() -> None:
    writer = _writer()
    if writer is not None:
        writer.flush()


# -- setup ------------------------------------------------------------------------------------


def configure_logging(
    level: str = "INFO",
    log_file: str | None = None,
    log_format: str = "text",
    owner: tuple[int, int | None] | None = None,
) -> None:
    """Log at ``level`` to fd 2 (with ``log_file``: fd 2 is redirected to that file).

    ``owner`` (uid, gid): the user the process will run as; a log file created now is given
    to it, so that it can reopen the file after a rotation. Raises :class:`LogFileError`.
    """
    if log_format not in FORMATS:
        raise ValueError(f"log_format must be one of {FORMATS}, not {log_format!r}")
    if log_file:
        _redirect_stderr(open_log_file(log_file, owner))
    logging._srcfile = None  # no caller lookup per record
    logging.logThreads = False
    logging.logProcesses = False  # the formatters know the pid
    logging.logMultiprocessing = False
    writer = LogWriter(2)
    writer.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    root.addHandler(writer)
    root.setLevel(level.upper())
    writer.route_direct()


def open_log_file(path: str, owner: tuple[int, int | None] | None = None) -> int:
    """Open (or create, mode 0640) ``path`` for appending, without following a symlink.

    It must be a regular file (or a character device such as ``/dev/null``). A file created
    here is given to ``owner`` when set (root dropping privileges later). Returns the fd.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    created = False
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o640)
        created = True
    except FileExistsError:
        try:
            fd = os.open(path, flags | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang us
        except OSError as error:
            raise LogFileError(_why(path, error)) from None
    except OSError as error:
        raise LogFileError(_why(path, error)) from None
    try:
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISCHR(info.st_mode)):
            raise LogFileError(f"log file {path}: not a regular file")
        if not created:
            os.set_blocking(fd, True)
        if created and owner is not None and os.geteuid() == 0:
            uid, gid = owner
            os.fchown(fd, uid, -1 if gid is None else gid)
    except LogFileError:
        os.close(fd)
        raise
    except OSError as error:
        os.close(fd)
        raise LogFileError(_why(path, error)) from None
    return fd


def _why(path: str, error: OSError) -> str:
    if error.errno == getattr(os, "ELOOP", 40):
        return f"log file {path}: is a symbolic link (refused)"
    return f"log file {path}: {error.strerror or error}"


def _redirect_stderr(fd: int) -> None:
    try:
        sys.stderr.flush()
        os.dup2(fd, 2)  # fd 2 stays inheritable (and not close-on-exec)
    finally:
        os.close(fd)


def reopen_log_file(path: str) -> bool:
    """Point fd 2 at ``path`` again (after log rotation moved the old file).

    Never raises: if the file cannot be opened (its directory was renamed, or is not
    writable by this user), logs why and keeps writing to the old file. Returns success.
    """
    flush_logs()
    try:
        fd = open_log_file(path)
    except LogFileError as error:
        log.error("cannot reopen the log file, still writing to the old one: %s", error)
        return False
    _redirect_stderr(fd)
    return True
