"""The check that a client's mistake never logs an error or a traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest


def logged_errors(
    caplog: pytest.LogCaptureFixture,
    provoked: tuple[type[BaseException], ...] = (),
    expected: Callable[[logging.LogRecord], bool] = lambda record: False,
    phases: tuple[str, ...] = ("setup", "call"),
) -> list[str]:
    """ERROR records and tracebacks logged during ``phases``, but those a test provoked on
    purpose (exceptions of the ``provoked`` types, or records ``expected`` accepts)."""
    records = [record for phase in phases for record in caplog.get_records(phase)]  # type: ignore[arg-type]
    return [
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_info}"
        for r in records
        if (r.levelno >= logging.ERROR or r.exc_info)
        and not (r.exc_info and isinstance(r.exc_info[1], provoked))
        and not expected(r)
    ]
