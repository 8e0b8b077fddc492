"""``serve_blocking``: an SMTP server of a protocol factory on a free loopback port, for the
length of some blocking clients (smtplib code, each in its own thread, all at once)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from tests.support.wait import WAIT

T = TypeVar("T")


def serve_blocking(factory: Callable[[], Any], *clients: Callable[[int], T]) -> list[T]:
    """Run every ``client(port)`` against a server of ``factory``; their results, in order.
    The server is closed when they are done (or after :data:`WAIT` seconds, an error)."""

    async def scenario() -> list[T]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            runs = [loop.run_in_executor(None, client, port) for client in clients]
            return list(await asyncio.wait_for(asyncio.gather(*runs), WAIT))
        finally:
            server.close()

    return asyncio.run(scenario())
