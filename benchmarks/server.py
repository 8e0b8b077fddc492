"""Start one SMTP server for the benchmark: ``server.py KIND PORTFILE [--profile FILE]``.

KIND is one of :data:`KINDS` (one process, one event loop) or :data:`FARM_KINDS` (the real
``farm serve``: a supervisor and its workers, see :func:`farm_serve`).

For :data:`KINDS`: The server listens on 127.0.0.1, on a port the kernel picks,
and writes that port to PORTFILE (atomically, via a rename) once it is listening, so the runner
waits on readiness rather than on a sleep. One process, one event loop, logging at WARNING.
SIGTERM or SIGINT closes the listener and exits; with ``--profile`` the run is profiled with
cProfile and the stats are dumped to FILE on exit (see ``run.py --profile``).

``--malloc`` pins down one thing that otherwise varies from process to process. On Python 3.11
asyncio's socket transport reads with ``recv(256 KiB)``: every read allocates a 256 KiB bytes
object, shrinks it to the data received and frees it. glibc serves allocations above its mmap
threshold (128 KiB at start) with mmap, so each read costs mmap + mremap + munmap, unless the
threshold has been raised, which glibc does for good the first time a large mmap'd block is
freed whole. Whether that has happened by the time a server starts depends on accidents such as
whether its modules were compiled from source or loaded from ``__pycache__``: the same server
measured 51 or 120 CPU µs/msg depending on it. So:

* ``warm`` (default): allocate and free a 4 MiB block at startup, as a long-running server does
  the first time it receives a large message: reads then come from the heap, no syscalls.
* ``cold``: pin the threshold at glibc's initial 128 KiB (``mallopt(M_MMAP_THRESHOLD)``), so
  every asyncio read pays the three extra syscalls; this is a fresh process's state.
* ``asis``: do nothing (the state is then whatever the imports left).

uvloop reads into its own buffer and is unaffected.

:data:`FARM_KINDS` run ``farm.cli.main(["serve", "-b", "127.0.0.1:0", "-w", N, "--handler",
"farm.handlers:Sink", "--log-level", "WARNING", "--uvloop" | "--no-uvloop"])`` in this process,
which is what ``python -m farm serve ...`` does, after the same ``--malloc`` step (the workers
are forked from the supervisor and inherit its allocator state). PORTFILE then gets port 0: the
supervisor binds a port the kernel picks, and the runner waits for its readiness (sd_notify
``READY=1``, i.e. every worker READY), finds the port and checks it answers 220.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Import ``farm`` from this checkout even when it is not installed in the venv.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HOSTNAME = "bench.test"
MALLOC_STATE = "asis"

#: KIND -> (engine, event loop).
KINDS: dict[str, tuple[str, str]] = {
    "aiosmtpd-asyncio": ("aiosmtpd", "asyncio"),
    "aiosmtpd-uvloop": ("aiosmtpd", "uvloop"),
    "farm-asyncio": ("farm", "asyncio"),
    "farm-uvloop": ("farm", "uvloop"),
    # The engine counting into a worker's metrics (WorkerStats), to price the metrics.
    "farm-uvloop-stats": ("farm-stats", "uvloop"),
    # Not a server: the least Python that answers smtp-source (benchmarks/floor.py).
    "floor-uvloop": ("floor", "uvloop"),
}

#: KIND -> (workers, event loop, profile) for the real ``farm serve`` (supervisor + workers).
#: The profiles (see :func:`farm_toml`): ``production`` is how the README says to run the farm;
#: the others take one thing away, to show what it costs, and are labelled as such.
FARM_KINDS: dict[str, tuple[int, str, str]] = {
    "farm-1w": (1, "uvloop", "production"),
    "farm-2w": (2, "uvloop", "production"),
    "farm-1w-asyncio": (1, "asyncio", "production"),
    "farm-2w-asyncio": (2, "asyncio", "production"),
    # Logging off (WARNING): the price of the INFO log, next to farm-1w.
    "farm-1w-nolog": (1, "uvloop", "nolog"),
    # The benchmark's loopback client exempt from the limits: the price of the limits.
    "farm-1w-nolimits": (1, "uvloop", "nolimits"),
    # Neither: the engine inside farm serve, as earlier versions of this benchmark ran it.
    "farm-1w-bare": (1, "uvloop", "bare"),
}
FARM_HANDLER = "farm.handlers:Sink"
#: What every profile shares with the README's production example ("Running an inbound MX"):
#: per-client limits on for the benchmark's own address (loopback is exempt by default), set
#: high enough that the benchmark's 20 parallel sessions are never refused, but counted.
PRODUCTION_LIMITS = {
    "sessions_per_ip": 1000,
    "messages_per_ip": 100_000_000,
    "auth_failures_per_ip": 10,
    "exempt_networks": [],
}
#: What the production profile's log must show per message: its ``msg=`` line.
MESSAGE_LINE = re.compile(rb" farm\.smtp: session=\S+ msg=")


def farm_toml(workdir: Path, name: str, profile: str, extra: str = "") -> Path:
    """A farm.toml for a profile: ``production`` = INFO log to a file + limits applying to the
    client; ``nolog`` = log level WARNING; ``nolimits`` = loopback exempt (the default);
    ``bare`` = both. ``extra``: more TOML (a handler's tables) appended."""
    lines = []
    if profile in ("production", "nolimits"):
        lines.append(f'log_file = "{workdir / (name + ".log")}"')
    else:
        lines.append('log_level = "WARNING"')
    if profile in ("production", "nolog"):
        lines.append("[limits]")
        for key, value in PRODUCTION_LIMITS.items():
            lines.append(f"{key} = {value!r}".replace("'", '"'))
    path = workdir / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def farm_argv(kind: str, workdir: Path | None = None) -> list[str]:
    """The ``farm`` command line for a :data:`FARM_KINDS` kind."""
    workers, loop_name, profile = FARM_KINDS[kind]
    config = farm_toml(workdir or Path("."), kind, profile)
    return [
        "serve",
        "-c",
        str(config),
        "-b",
        "127.0.0.1:0",
        "-w",
        str(workers),
        "--handler",
        FARM_HANDLER,
        "--uvloop" if loop_name == "uvloop" else "--no-uvloop",
    ]


def farm_serve(kind: str, portfile: Path) -> int:
    """Run ``farm serve`` in this process (as ``python -m farm serve`` would); its exit status."""
    from farm.cli import main as farm_main

    tmp = portfile.with_name(portfile.name + ".tmp")
    tmp.write_text(f"0 {os.getpid()} {MALLOC_STATE} {FARM_HANDLER}\n")
    tmp.replace(portfile)
    return farm_main(farm_argv(kind, portfile.parent))


def protocol_factory(
    engine: str, loop: asyncio.AbstractEventLoop
) -> tuple[Callable[[], asyncio.BaseProtocol], str]:
    """A factory of SMTP protocol instances with a do-nothing handler, and its description."""
    if engine == "floor":
        from floor import FloorProtocol

        return FloorProtocol, "no handler (canned replies)"
    if engine == "aiosmtpd":
        from aiosmtpd.handlers import Sink
        from aiosmtpd.smtp import SMTP

        aio_handler = Sink()
        return (lambda: SMTP(aio_handler, hostname=HOSTNAME)), "aiosmtpd.handlers.Sink"

    from farm.smtp import SMTP as FarmSMTP

    handler: Any
    try:
        from farm.handlers import Sink as FarmSink  # type: ignore[import-not-found]

        handler, name = FarmSink(), "farm.handlers.Sink"
    except ImportError:

        class LocalSink:
            """No hooks at all: every command takes farm's synchronous path."""

        handler, name = LocalSink(), "hook-less local Sink"
    if engine == "farm-stats":
        from farm.metrics import WorkerStats

        stats = WorkerStats()

        build = FarmSMTP.protocol_factory(handler, hostname=HOSTNAME, loop=loop)

        def counting() -> FarmSMTP:
            protocol = build()
            protocol.stats = stats
            return protocol

        return counting, name + " + WorkerStats"
    # As a farm worker builds its sessions' protocols (with its loop).
    return FarmSMTP.protocol_factory(handler, hostname=HOSTNAME, loop=loop), name


async def serve(engine: str, portfile: Path) -> None:
    loop = asyncio.get_running_loop()
    factory, handler_name = protocol_factory(engine, loop)
    server = await loop.create_server(factory, host="127.0.0.1", port=0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tmp = portfile.with_name(portfile.name + ".tmp")
    tmp.write_text(f"{port} {os.getpid()} {MALLOC_STATE} {handler_name}\n")
    tmp.replace(portfile)
    await stop.wait()
    server.close()
    # Connections still open are simply dropped by the process exit; waiting for them could
    # hang on a client that never closes.


def set_malloc_state(state: str) -> str:
    """Put glibc's mmap threshold in a known state (see the module docstring)."""
    if state == "warm":
        block = bytes(4 << 20)  # malloc'd, so mmap'd; freeing it raises the threshold
        del block
        return "warm"
    if state == "cold":
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            m_mmap_threshold = -3
            if libc.mallopt(m_mmap_threshold, 128 * 1024) == 1:
                return "cold"
        except (OSError, AttributeError):
            pass
        return "asis-no-mallopt"
    return "asis"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted([*KINDS, *FARM_KINDS]))
    parser.add_argument("portfile", type=Path)
    parser.add_argument("--profile", type=Path, help="write cProfile stats here on exit")
    parser.add_argument("--malloc", choices=("warm", "cold", "asis"), default="warm")
    args = parser.parse_args()
    global MALLOC_STATE
    if args.kind in FARM_KINDS:
        if args.profile is not None:
            parser.error("--profile needs a single-process kind")
        # No --malloc step: the farm runs in the allocator state it gives itself, as in
        # production (its reads go into its own buffer, see benchmarks/README.md).
        MALLOC_STATE = "farm-default"
        sys.exit(farm_serve(args.kind, args.portfile))
    logging.basicConfig(level=logging.WARNING)
    engine, loop_name = KINDS[args.kind]
    MALLOC_STATE = set_malloc_state(args.malloc)

    def run() -> None:
        if loop_name == "uvloop":
            import uvloop

            uvloop.run(serve(engine, args.portfile))
        else:
            asyncio.run(serve(engine, args.portfile))

    if args.profile is None:
        run()
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        run()
    finally:
        profiler.disable()
        profiler.dump_stats(str(args.profile))


if __name__ == "__main__":
    main()
