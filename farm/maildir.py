"""A durable Maildir delivery handler: 250 only once the message is safely on disk.

Each message is written, exactly as received, to ``tmp/<unique name>``, fsynced, renamed into
``new/``, and the ``new/`` directory is fsynced; only then does the client get ``250``. Any
``OSError`` (disk full, permissions, I/O error) gives ``451 4.3.0`` and leaves nothing behind in
``tmp/`` or ``new/``. The file I/O runs in the loop's default executor, so the event loop keeps
serving other sessions meanwhile.

Stale ``tmp/`` files: a worker killed mid-write leaves a partial file in ``tmp/``. As qmail's
maildir(5) asks, regular files in ``tmp/`` not touched (neither modified nor read) for
``stale_tmp_age`` seconds (default 129600, 36 hours) are removed: on first use (the first
delivery), then at most once an hour, in the executor, without delaying the delivery. With
``per_recipient`` every ``path/<name>/tmp/`` is swept (and ``path/tmp/``). Symbolic links are
never followed nor removed (a symlinked ``tmp/`` or mailbox is skipped), nor is anything but a
regular file. Each sweep logs one line with the count removed (INFO, DEBUG when 0); errors are
logged as warnings and never affect a delivery. ``stale_tmp_age=0`` disables the sweep.

Use it from ``farm.toml``::

    handler = "farm.maildir:Maildir"
    [handler_args]
    path = "/var/mail/inbound"
    per_recipient = true
    # stale_tmp_age = 129600   # seconds; 0: never remove stale tmp/ files
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Iterable
from typing import Any

from farm.smtp.body import Body, envelope_body

__all__ = ["DELIVERY_FAILED", "Maildir", "mailbox_dir_name"]

log = logging.getLogger("farm.maildir")

DELIVERY_FAILED = "451 4.3.0 Requested action aborted: error in processing"

#: Characters kept in a per-recipient directory name; anything else becomes ``_``.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
#: Longest per-recipient directory name (file names are limited to 255 bytes).
_MAX_NAME = 200
_SUBDIRS = ("tmp", "new", "cur")
#: At most this many cleanup errors are logged one by one per sweep.
_MAX_REPORTED = 5
_DIR_MODE = 0o700
_FILE_MODE = 0o600
#: qmail's rule: a file in tmp/ untouched for 36 hours is left over from a failed delivery.
STALE_TMP_AGE = 36 * 3600
#: Seconds between two sweeps of tmp/ by one handler.
CLEANUP_INTERVAL = 3600.0


def mailbox_dir_name(address: str) -> str:
    """The per-recipient directory for ``address``: its local part, sanitised.

    Only ``[A-Za-z0-9._-]`` are kept (others become ``_``); a name that would be hidden, empty,
    ``.`` or ``..`` gets a leading ``_``, so it can never leave the Maildir root.
    """
    local = address.rpartition("@")[0] if "@" in address else address
    name = _UNSAFE.sub("_", local)[:_MAX_NAME]
    if not name or name.startswith("."):
        name = "_" + name
    return name


def _host_part() -> str:
    """This host's name as the Maildir convention writes it (``/`` and ``:`` escaped)."""
    host = socket.gethostname() or "localhost"
    return host.replace("/", r"\057").replace(":", r"\072")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(paths: Iterable[str]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            os.unlink(path)


class Maildir:
    """Deliver every message durably into the Maildir at ``path``.

    With ``per_recipient``, each distinct recipient gets one copy in its own Maildir,
    ``path/<local part>/`` (see :func:`mailbox_dir_name`); a message either reaches all of
    them or, with ``451``, none. ``fsync=False`` skips the fsyncs (faster, not crash-safe).
    Missing directories are created with mode 0700. Files in ``tmp/`` untouched for
    ``stale_tmp_age`` seconds are removed now and then (see the module docstring; 0: never).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        per_recipient: bool = False,
        fsync: bool = True,
        stale_tmp_age: float = STALE_TMP_AGE,
    ) -> None:
        self.path = os.fspath(path)
        self.per_recipient = bool(per_recipient)
        self.fsync = bool(fsync)
        if not stale_tmp_age >= 0:
            raise ValueError(f"stale_tmp_age must be >= 0 seconds, not {stale_tmp_age!r}")
        self.stale_tmp_age = float(stale_tmp_age)
        self._counter = itertools.count(1)
        self._host = _host_part()
        #: time.monotonic() at or after which the next sweep of tmp/ is due (0: at first use).
        self._next_cleanup = 0.0
        #: The latest sweep (kept so it is not garbage-collected while it runs).
        self._cleanup_task: asyncio.Task[int] | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self._schedule_cleanup()
        # Copied from the body (a spool file past farm.smtp.body's threshold), never read whole.
        body = envelope_body(envelope)
        deliver = functools.partial(self._deliver, body, self._targets(envelope))
        session_id = getattr(session, "id", "") or "-"
        try:
            names = await asyncio.get_running_loop().run_in_executor(None, deliver)
        except OSError as error:
            log.warning(
                "session=%s maildir delivery failed path=%s: %s",
                session_id,
                self.path,
                _describe(error),
            )
            return DELIVERY_FAILED
        log.debug("session=%s maildir delivered %s", session_id, " ".join(names))
        return f"250 2.0.0 Ok: queued as {names[0]}"

    # -- stale tmp/ files ----------------------------------------------------------------------

    def _schedule_cleanup(self) -> None:
        """Start a sweep of tmp/ in the background if one is due (never raises)."""
        if not self.stale_tmp_age:
            return
        now = time.monotonic()
        if now < self._next_cleanup:
            return
        self._next_cleanup = now + CLEANUP_INTERVAL
        try:
            self._cleanup_task = asyncio.get_running_loop().create_task(self.clean_tmp())
        except Exception as error:  # pragma: no cover - no running loop, loop closing
            log.warning("maildir tmp cleanup not started path=%s: %s", self.path, error)

    async def clean_tmp(self) -> int:
        """Remove the stale files of tmp/ (in the executor); how many. Logs, never raises."""
        try:
            removed, failures = await asyncio.get_running_loop().run_in_executor(
                None, self.remove_stale_tmp
            )
        except Exception as error:
            log.warning(
                "maildir tmp cleanup failed path=%s: %s",
                self.path,
                _describe(error) if isinstance(error, OSError) else repr(error),
            )
            return 0
        level = logging.INFO if removed else logging.DEBUG
        log.log(level, "maildir tmp cleanup path=%s removed=%d", self.path, removed)
        for failure in failures[:_MAX_REPORTED]:
            log.warning("maildir tmp cleanup path=%s: %s", self.path, failure)
        if len(failures) > _MAX_REPORTED:
            log.warning(
                "maildir tmp cleanup path=%s: %d more errors",
                self.path,
                len(failures) - _MAX_REPORTED,
            )
        return removed

    def remove_stale_tmp(self, now: float | None = None) -> tuple[int, list[str]]:
        """Blocking: remove every stale regular file in the tmp/ directories.

        A file is stale when both its modification and access times are more than
        ``stale_tmp_age`` seconds before ``now`` (default: the current time). Returns the count
        removed and one line per error met (the sweep goes on past them).
        """
        cutoff = (time.time() if now is None else now) - self.stale_tmp_age
        removed, failures = 0, []
        for maildir in self._maildirs():
            count, errors = _remove_stale(os.path.join(maildir, "tmp"), cutoff)
            removed += count
            failures += errors
        return removed, failures

    def _maildirs(self) -> list[str]:
        """The Maildirs whose tmp/ is swept: ``path``, and with per_recipient each subdirectory."""
        maildirs = [self.path]
        if not self.per_recipient:
            return maildirs
        try:
            with os.scandir(self.path) as entries:
                maildirs += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            pass
        return maildirs

    def _targets(self, envelope: Any) -> list[str]:
        """The Maildirs this message goes to (each once)."""
        if not self.per_recipient:
            return [self.path]
        targets = [os.path.join(self.path, mailbox_dir_name(r)) for r in envelope.rcpt_tos]
        return list(dict.fromkeys(targets)) or [self.path]

    def _unique_name(self) -> str:
        """``<sec>.M<usec>P<pid>Q<n>.<host>``: unique across time, processes and deliveries."""
        now = time.time_ns()
        seconds, nanos = divmod(now, 1_000_000_000)
        return f"{seconds}.M{nanos // 1000}P{os.getpid()}Q{next(self._counter)}.{self._host}"

    # -- blocking part: runs in the executor ------------------------------------------------

    def _deliver(self, content: Body, targets: list[str]) -> list[str]:
        """Write ``content`` into every Maildir of ``targets``; the new names.

        All-or-nothing: on an ``OSError`` every file written so far (in ``tmp/`` or ``new/``)
        is removed before the error propagates.
        """
        written: list[tuple[str, str, str]] = []  # (maildir, name, tmp path)
        renamed: list[str] = []
        try:
            for maildir in targets:
                name = self._unique_name()
                tmp = os.path.join(maildir, "tmp", name)
                written.append((maildir, name, tmp))
                self._write_tmp(maildir, tmp, content)
            for maildir, name, tmp in written:
                final = os.path.join(maildir, "new", name)
                try:
                    os.rename(tmp, final)
                except FileNotFoundError:  # new/ went missing since tmp/ was checked
                    self._make_maildir(maildir)
                    os.rename(tmp, final)
                renamed.append(final)
            if self.fsync:
                for maildir in dict.fromkeys(m for m, _, _ in written):
                    _fsync_dir(os.path.join(maildir, "new"))
        except BaseException:
            _unlink_quietly(renamed)
            _unlink_quietly(tmp for _, _, tmp in written[len(renamed) :])
            raise
        return [name for _, name, _ in written]

    def _write_tmp(self, maildir: str, tmp: str, content: Body) -> None:
        """Create ``tmp`` (exclusively), write all of ``content`` and fsync it."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, _FILE_MODE)
        except FileNotFoundError:
            self._make_maildir(maildir)
            fd = os.open(tmp, flags, _FILE_MODE)
        try:
            content.copy_to(fd)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _make_maildir(self, maildir: str) -> None:
        """Create ``maildir`` and its ``tmp``/``new``/``cur`` (mode 0700), durably."""
        created = _makedirs(maildir)
        for sub in _SUBDIRS:
            path = os.path.join(maildir, sub)
            try:
                os.mkdir(path, _DIR_MODE)
            except FileExistsError:
                continue
            created.append(path)
        if self.fsync:
            for parent in dict.fromkeys(os.path.dirname(path) for path in created):
                _fsync_dir(parent or ".")


def _remove_stale(tmp: str, cutoff: float) -> tuple[int, list[str]]:
    """Unlink the regular files in directory ``tmp`` untouched since ``cutoff`` (epoch seconds).

    ``tmp`` itself is opened without following a symlink, entries are judged by ``lstat``, and
    each is unlinked relative to that directory, so no symlink is ever followed or removed. A
    missing ``tmp`` counts as empty. Returns the count removed and the errors met.
    """
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if os.path.islink(tmp):  # ELOOP or ENOTDIR: not ours to sweep
            return 0, [f"{tmp} is a symbolic link, not swept"]
        if isinstance(error, FileNotFoundError | NotADirectoryError):  # no Maildir (yet)
            return 0, []
        return 0, [f"{tmp}: {_describe(error)}"]
    removed, failures = 0, []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                    if (
                        not stat.S_ISREG(info.st_mode)
                        or max(info.st_mtime, info.st_atime) >= cutoff
                    ):
                        continue
                    os.unlink(entry.name, dir_fd=fd)
                    removed += 1
                except FileNotFoundError:  # gone meanwhile (renamed, or another worker's sweep)
                    continue
                except OSError as error:
                    failures.append(f"{os.path.join(tmp, entry.name)}: {_describe(error)}")
    except OSError as error:
        failures.append(f"{tmp}: {_describe(error)}")
    finally:
        os.close(fd)
    return removed, failures


def _makedirs(path: str) -> list[str]:
    """``os.makedirs(path, 0o700, exist_ok=True)`` that returns the directories it created."""
    path = os.path.abspath(path)
    missing: list[str] = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    created: list[str] = []
    for directory in reversed(missing):
        try:
            os.mkdir(directory, _DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue
        created.append(directory)
    return created


def _describe(error: OSError) -> str:
    """One line about an I/O error (no traceback)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
