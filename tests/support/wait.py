"""The one polling helper: wait for a condition, never for a fixed time (from a thread, or
inside an event loop without blocking it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

#: The generous default bound of every wait (seconds), for a loaded 2-core machine.
WAIT = 30.0

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], what: str = "", timeout: float = WAIT, interval: float = 0.01
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    ``what`` says what is awaited; after ``timeout`` seconds an AssertionError names it.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or predicate}")
        time.sleep(interval)


async def wait_for_async(
    predicate: Callable[[], T], what: str = "", timeout: float = WAIT, interval: float = 0.01
) -> T:
    """:func:`wait_for` for a coroutine: the loop runs on while ``predicate`` is polled."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or predicate}")
        await asyncio.sleep(interval)
    return value
