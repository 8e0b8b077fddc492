"""A handler that appends one line per accepted message to a file (``handler_args.path``).

Each line is ``<worker pid> <recipient>[,<recipient>...]``, written with a single ``write`` on
an ``O_APPEND`` descriptor, so concurrent workers never interleave lines. The line is written
before the 250 is returned: a message a client saw accepted is always in the file.

``delay`` (seconds) makes every DATA take that long (without blocking the loop), so that
transactions are in flight when a test sends a signal; with ``started_path`` a line is also
appended there as soon as a DATA reaches the handler.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class Counting:
    def __init__(self, path: str, delay: float = 0.0, started_path: str | None = None) -> None:
        self.path = path
        self.delay = float(delay)
        self.started_path = started_path

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        line = f"{os.getpid()} {','.join(envelope.rcpt_tos)}\n"
        if self.started_path:
            _append(self.started_path, line)
        if self.delay:
            await asyncio.sleep(self.delay)
        _append(self.path, line)
        return "250 2.0.0 counted"
