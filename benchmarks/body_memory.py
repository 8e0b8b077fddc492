"""A worker's peak RSS while it receives N parallel large messages (issue 12, item 6).

Starts ``farm serve -w 1`` with the chosen handler, reads the worker's resident memory when idle,
resets its high-water mark (``/proc/PID/clear_refs``, value 5), sends ``--parallel`` messages of
``--size`` MB at once over raw sockets, then reads the high-water mark (``VmHWM``). Prints both
and the difference. Every process it starts is stopped by pid at the end.

    .venv/bin/python benchmarks/body_memory.py --handler maildir
    .venv/bin/python benchmarks/body_memory.py --handler relay     # to Postfix's smtp-sink
    .venv/bin/python benchmarks/body_memory.py --handler sink
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import free_port

REPO = Path(__file__).resolve().parent.parent
SMTP_SINK = "/usr/sbin/smtp-sink"
WAIT = 60.0


def status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match, field
    return int(match[1])


def wait_for(condition, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def body(size: int) -> bytes:
    line = b"y" * 76 + b"\r\n"
    return b"Subject: big\r\n\r\n" + line * (size // len(line))


def send(port: int, data: bytes, replies: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"EHLO bench.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        sock.sendall(b"MAIL FROM:<a@bench.test>\r\n")
        reader.readline()
        sock.sendall(b"RCPT TO:<b@farm.test>\r\n")
        reader.readline()
        sock.sendall(b"DATA\r\n")
        reader.readline()
        sock.sendall(data)
        sock.sendall(b".\r\n")
        replies.append(reader.readline())
        sock.sendall(b"QUIT\r\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handler", choices=("maildir", "relay", "sink"), default="maildir")
    parser.add_argument("--size", type=int, default=20, help="MB per message")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--smtp", action="append", default=[], help="extra [smtp] KEY=VALUE")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="farm-bodymem-"))
    os.chmod(work, 0o755)
    processes: list[subprocess.Popen[bytes]] = []
    handler_lines = []
    if args.handler == "maildir":
        handler_lines = [
            'handler = "farm.maildir:Maildir"',
            "[handler_args]",
            f'path = "{work / "Maildir"}"',
        ]
    elif args.handler == "sink":
        handler_lines = ['handler = "farm.handlers:Sink"']
    else:
        sink_port = free_port()
        command = [SMTP_SINK, "-h", "sink.test", f"127.0.0.1:{sink_port}", "16"]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "nobody"]
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        handler_lines = [
            'handler = "farm.relay:Relay"',
            "[handler_args]",
            f'next_hop = "127.0.0.1:{sink_port}"',
            'domains = ["farm.test"]',
        ]
    smtp = [f"data_size_limit = {64 * 1024 * 1024}", *args.smtp]
    config = work / "farm.toml"
    config.write_text("\n".join([*handler_lines, "[smtp]", *smtp]) + "\n")
    port = free_port()
    log = work / "farm.log"
    command = [sys.executable, "-m", "farm", "serve", "-c", str(config), "-w", "1"]
    command += ["-b", f"127.0.0.1:{port}", "--log-file", str(log), "--log-level", "WARNING"]
    farm = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    processes.append(farm)
    try:
        worker = wait_for(lambda: psutil.Process(farm.pid).children(), "the worker")[0].pid

        def greets() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    return sock.recv(100).startswith(b"220")
            except OSError:
                return False

        wait_for(greets, "the greeting")
        data = body(args.size * 1000 * 1000)
        idle = status_kib(worker, "VmRSS")
        Path(f"/proc/{worker}/clear_refs").write_text("5")
        replies: list[bytes] = []
        threads = [
            threading.Thread(target=send, args=(port, data, replies)) for _ in range(args.parallel)
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        elapsed = time.monotonic() - started
        peak = status_kib(worker, "VmHWM")
        after = status_kib(worker, "VmRSS")
        print(
            f"handler={args.handler} messages={args.parallel}x{args.size}MB "
            f"replies={sorted(set(r.strip().decode()[:3] for r in replies))} "
            f"idle_rss={idle / 1024:.1f}MiB peak_rss={peak / 1024:.1f}MiB "
            f"peak_growth={(peak - idle) / 1024:.1f}MiB after={after / 1024:.1f}MiB "
            f"time={elapsed:.2f}s"
        )
        return 0 if len(replies) == args.parallel else 1
    finally:
        for process in reversed(processes):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM if process is farm else signal.SIGKILL)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    sys.exit(main())
