"""The INFO log's own path, alone: what the engine's two lines per message cost.

Usage: ``PYTHONPATH=TREE python benchmarks/log_path.py [--messages N] [--format text|json]
[--part PART]`` (``TREE``: the checkout whose ``farm`` to measure)

Logs ``N`` messages' two lines (a ``MessageLine`` and a ``SessionLine`` of distinct sessions,
through ``log_fields`` into ``farm.logs``' writer, batching as in a worker) to ``/dev/null``,
flushed every 300 messages. ``--part``: ``all`` (the default), ``hot`` (log and queue the lines,
never format or write them), ``none`` (everything but the logging: the baseline to subtract).
Meant for callgrind, whose instruction counts do not move with the machine's load::

    PYTHONPATH=$PWD valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python benchmarks/log_path.py --part all

once per part; (all - none) / N is the whole path per message, (hot - none) / N its hot path
(what runs between two SMTP replies), (all - hot) / N the flush. Without valgrind it prints the
process time per message of the part it ran (noisy on a busy machine).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time

from farm.logs import LogWriter, configure_logging
from farm.smtp.logline import MessageLine, SessionLine, log_fields
from farm.smtp.session import Session

#: Messages per batch (a worker's batch at about 3000 messages a second).
BATCH = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--part", choices=("all", "hot", "none"), default="all")
    args = parser.parse_args()
    out = sys.stdout
    configure_logging("INFO", "/dev/null", args.format)  # (fd 2 is /dev/null from now on)
    loop = asyncio.new_event_loop()
    writer = next(h for h in logging.getLogger().handlers if isinstance(h, LogWriter))
    writer.start_batching(loop)  # the loop never runs: flushed below instead of by its timer
    flush = writer._batch.lines.clear if args.part == "hot" else writer.flush
    log = logging.getLogger("farm.smtp")
    sessions = []
    for n in range(args.messages):
        session = Session(loop)
        session.peer = ("127.0.0.1", 20000 + n % 40000)
        session.id = f"5f3a.{n}"
        session.host_name = "client.example.org"
        sessions.append(session)
    started = time.process_time()
    if args.part != "none":
        for n, session in enumerate(sessions, 1):
            log_fields(log, MessageLine, (session, 1, "s@bench.test", 1, 1148, "250", 0.0021, ""))
            log_fields(log, SessionLine, (session, 5, 1, 0, 1148, "quit", 0.0043, ""))
            if n % BATCH == 0:
                flush()
        flush()
    spent = time.process_time() - started
    out.write(f"{args.part}: {spent / args.messages * 1e6:.2f} µs per message (process time)\n")
    loop.close()


if __name__ == "__main__":
    main()
