"""The supervisor's pidfile, written safely (often as root) and removed on every way out.

Written before privileges are dropped, so it must not be a way to overwrite another file:
it is opened with ``O_NOFOLLOW`` (a symlink is refused), must be a regular file with one link,
and an existing file owned by another user is refused, never truncated. At exit the file is
removed if it still is ours (same inode, our pid); when the directory is not writable any more
(privileges dropped), it is emptied through the descriptor kept open since it was written, so
that no stale pid is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat

__all__ = ["Pidfile", "PidfileError", "write_pidfile"]

log = logging.getLogger("farm.pidfile")


class PidfileError(Exception):
    """The pidfile cannot be written safely; ``str()`` is one line."""


class Pidfile:
    """A pidfile written by this process (see :func:`write_pidfile`)."""

    def __init__(self, path: str, fd: int, device: int, inode: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._id = (device, inode)
        self._pid = os.getpid()

    def check_removable(self) -> None:
        """Warn now (after a privilege drop) if the file could not be removed at exit."""
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.access(directory, os.W_OK | os.X_OK):
            log.warning(
                "pidfile %s: its directory is not writable by this user, so at exit the file "
                "will be emptied, not removed (use a directory the user owns, e.g. /run/farm)",
                self.path,
            )

    def remove(self) -> None:
        """Remove the file if it is still ours; else leave it. Idempotent; only in the
        process that wrote it (a forked child never removes it)."""
        fd, self._fd = self._fd, None
        if fd is None or os.getpid() != self._pid:
            return
        try:
            if not self._still_ours():
                return
            try:
                os.unlink(self.path)
            except OSError as error:
                os.ftruncate(fd, 0)
                log.warning("pidfile %s emptied, not removed: %s", self.path, error.strerror)
        except OSError as error:
            log.warning("pidfile %s: %s", self.path, error.strerror or error)
        finally:
            os.close(fd)

    def _still_ours(self) -> bool:
        try:
            info = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if (info.st_dev, info.st_ino) != self._id:
            return False  # replaced meanwhile (another instance's): not ours to remove
        with open(self.path, "rb") as current:
            return current.read(64).strip() == str(self._pid).encode()


def write_pidfile(path: str) -> Pidfile:
    """Write this process's pid to ``path`` (mode 0644); raises :class:`PidfileError`."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        if error.errno == getattr(os, "ELOOP", 40):
            raise PidfileError(f"pidfile {path}: is a symbolic link (refused)") from None
        raise PidfileError(f"pidfile {path}: {error.strerror or error}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PidfileError(f"pidfile {path}: not a regular file")
        if info.st_uid != os.geteuid():
            raise PidfileError(
                f"pidfile {path}: owned by uid {info.st_uid}, not by us: refusing to overwrite it"
            )
        if info.st_nlink != 1:
            raise PidfileError(f"pidfile {path}: has {info.st_nlink} hard links (refused)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except PidfileError:
        os.close(fd)
        raise
    except OSError as error:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise PidfileError(f"pidfile {path}: {error.strerror or error}") from None
    return Pidfile(path, fd, info.st_dev, info.st_ino)
