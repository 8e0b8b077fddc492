"""Run one SMTP engine on one event loop until SIGTERM/SIGINT, then drain and exit."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any

from farm.smtp import SMTP
from farm.smtp.drain import SessionTracker

log = logging.getLogger("farm.serve")


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    handler: Any
    hostname: str | None = None
    use_uvloop: bool = True
    graceful_timeout: float = 30.0


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"bad bind address {text!r}: expected HOST:PORT or [IPv6]:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"bad bind address {text!r}: port out of range")
    return host, number


def load_handler(spec: str) -> Any:
    """``module:attr`` -> a handler instance (classes are instantiated without arguments)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"bad handler {spec!r}: expected MODULE:ATTR")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import handler module {module_name!r}: {error}") from None
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"handler module {module_name!r} has no attribute {attr!r}") from None
    return target() if isinstance(target, type) else target


async def _serve(options: ServeOptions) -> None:
    loop = asyncio.get_running_loop()
    sessions = SessionTracker()
    server = await loop.create_server(
        lambda: sessions.add(SMTP(options.handler, hostname=options.hostname)),
        options.host,
        options.port,
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    where = ", ".join(_address(s.getsockname()) for s in server.sockets)
    print(f"farm: SMTP on {where} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    await stop.wait()
    log.info("stopping: draining %d session(s)", len(sessions.active))
    server.close()
    await sessions.drain(options.graceful_timeout)
    await server.wait_closed()


def _address(sockname: tuple[Any, ...]) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(options: ServeOptions) -> int:
    """Serve until SIGTERM or SIGINT; return the process exit status."""
    try:
        if options.use_uvloop:
            try:
                import uvloop
            except ImportError:
                asyncio.run(_serve(options))
            else:
                uvloop.run(_serve(options))
        else:
            asyncio.run(_serve(options))
    except OSError as error:
        print(f"farm: cannot listen on {options.host}:{options.port}: {error}", file=sys.stderr)
        return 1
    return 0
