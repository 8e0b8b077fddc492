"""A worker's protocol factory that never raises.

uvloop closes a listening server for good when its protocol factory raises once: the worker
would live on, heartbeats and all, and accept nothing more. So the worker's factories go
through :func:`guarded`: a session that cannot be set up (a bug, memory exhausted) answers
``421`` and closes, the error is logged, and the listener keeps accepting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("farm.worker")


class Unavailable(asyncio.Protocol):
    """A connection whose session could not be set up: ``421`` (RFC 5321 3.8), then close."""

    def __init__(self, hostname: str) -> None:
        self._reply = (
            f"421 4.3.2 {hostname} Service not available, closing transmission channel\r\n"
        ).encode("ascii", "replace")

    def connection_made(self, transport: Any) -> None:  # (uvloop's is no WriteTransport)
        transport.write(self._reply)
        transport.close()

    def data_received(self, data: bytes) -> None:
        """Whatever the client sent meanwhile goes unread: the connection is closing."""


def guarded(factory: Callable[[], Any], hostname: str) -> Callable[[], asyncio.BaseProtocol]:
    """``factory``, answering ``421`` instead of raising (its traceback logged the first
    time, a line each time after that)."""
    failures = 0

    def build() -> asyncio.BaseProtocol:
        nonlocal failures
        try:
            protocol: asyncio.BaseProtocol = factory()
            return protocol
        except Exception as error:
            failures += 1
            log.error(
                "cannot set up a session (%s: %s; %d so far): answered 421",
                type(error).__name__,
                error,
                failures,
                exc_info=failures == 1,
            )
            return Unavailable(hostname)

    return build
