"""CPU of the engine's inline command path per message, without sockets or a client.

Usage: ``PYTHONPATH=. .venv/bin/python benchmarks/inline_path.py [--messages 20000] [--runs 7]``

One :class:`farm.smtp.SMTP` (handler ``farm.handlers.Sink``: no hooks, so every command is
answered inside ``data_received``) is fed over a fake transport that keeps nothing: an EHLO,
then ``--messages`` transactions (``MAIL``, ``RCPT``, ``DATA``, a 10-line body, ``.``) in
pipelined batches of 10 messages per read. The process CPU time (``time.process_time``) of
the feeding, divided by the messages, is printed for each run, and the best run last: compare
two trees by running this in each (``PYTHONPATH`` picks the tree), best against best.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

from farm.handlers import Sink
from farm.smtp import SMTP

BATCH = 10
BODY = b"".join(b"Line %d of a small message body, about sixty octets.\r\n" % i for i in range(10))
MESSAGE = (
    b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n"
    + b"Subject: bench\r\n\r\n"
    + BODY
    + b".\r\n"
)


class NullTransport(asyncio.Transport):
    """Counts the replies' octets; never pauses, never closes by itself."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.7", 40000), "sockname": ("192.0.2.25", 25)}.get(name, default)

    def write(self, data: Any) -> None:
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        raise AssertionError("the benchmark's client is never paused")

    def resume_reading(self) -> None:
        pass


async def one_run(messages: int) -> float:
    """CPU seconds per message for one session of ``messages`` transactions."""
    protocol = SMTP(Sink(), hostname="bench.example")
    transport = NullTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"EHLO client.example\r\n")
    batch = MESSAGE * BATCH
    await asyncio.sleep(0)
    started = time.process_time()
    for _ in range(messages // BATCH):
        protocol.data_received(batch)
    elapsed = time.process_time() - started
    accepted = protocol.counts["accepted"]
    if accepted != messages // BATCH * BATCH or protocol._task is not None:
        raise SystemExit(f"only {accepted} of {messages} messages accepted inline")
    protocol.data_received(b"QUIT\r\n")
    protocol.connection_lost(None)
    return elapsed / accepted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    logging.getLogger("farm").setLevel(logging.WARNING)
    results = []
    for run in range(args.runs):
        per_message = asyncio.run(one_run(args.messages))
        results.append(per_message)
        print(f"run {run + 1}: {per_message * 1e6:.2f} us CPU per message")
    print(f"best of {args.runs}: {min(results) * 1e6:.2f} us CPU per message")


if __name__ == "__main__":
    main()
