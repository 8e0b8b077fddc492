"""Run a piece of a test in a forked child (to change its user or limits without touching ours)."""

from __future__ import annotations

import os
from collections.abc import Callable


def in_child(body: Callable[[], str]) -> tuple[int, str]:
    """Run ``body`` in a forked child; return its exit status and the string it returned."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(read_end)
            message = body()
        except BaseException as error:
            code, message = 1, f"{type(error).__name__}: {error}"
        try:
            os.write(write_end, message.encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), message
