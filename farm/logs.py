"""Logging setup: standard ``logging`` to stderr, or to a file that SIGUSR1 reopens."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def configure_logging(level: str = "INFO", log_file: str | None = None) -> None:
    """Log to stderr; with ``log_file``, stderr itself is redirected to that file.

    Redirecting file descriptor 2 (not just the handler) means workers, crash dumps written by
    ``faulthandler`` and anything printed by a handler all land in the same file.
    """
    if log_file:
        reopen_log_file(log_file)
    logging.basicConfig(level=level.upper(), format=FORMAT, stream=sys.stderr, force=True)


def reopen_log_file(path: str) -> None:
    """Point file descriptor 2 at ``path`` again (after log rotation moved the old file)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        sys.stderr.flush()
        os.dup2(fd, 2)
    finally:
        os.close(fd)
