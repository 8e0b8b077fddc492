"""Where a worker's time goes: py-spy over ``farm serve -w 1`` under smtp-source, summed by part.

Usage: ``.venv/bin/python benchmarks/breakdown.py [--messages N] [--workload per-conn|long]
[--profile production|nolog|nolimits|bare] [--relay]``

Starts ``farm serve -w 1`` with the benchmark's settings (``server.py farm_toml``: by default
as in production), warms it up, attaches ``py-spy record --native`` (the ``bench`` extra) to
the worker for one smtp-source run, and sorts every sample into one part of the work:

* the kernel, by system call (``write`` is sending replies, which on loopback includes
  delivering them to smtp-source; connection set-up and tear-down are ``accept4``, ``close``,
  ``setsockopt``, ``getsockname``, ``getpeername``, ``epoll_ctl``, ``io_uring_enter``);
* our Python, by module (with the C code it calls: uvloop's transport writes count for the
  engine, for instance): the log lines (``farm/logs.py``, ``farm/smtp/logline.py``), the limits
  (``farm/limits.py``, ``farm/supervisor/anvil.py``, ``shared_lock.py``), the metrics
  (``farm/metrics.py``), the framer (``farm/smtp/framing.py``), the rest of the engine
  (``farm/smtp``), the worker (``farm/supervisor/worker.py``), the relay (``farm/relay*``);
* the rest: uvloop/libuv and the interpreter itself (frames of no farm module);
* the log flusher thread, on its own.

A sample counts for the innermost farm module on its stack (a system call for the kernel, even
when our code made it). Samples waiting (``epoll_wait``, sleeps, lock waits) are left out. The
microseconds come from psutil's user and system CPU time of the same run (py-spy's samples
over-represent time spent in system calls, so the kernel's total is psutil's, and py-spy's
samples only split each of the two). py-spy interrupts the worker ~500 times a second, which
itself costs a little; the shares are what matters.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402  (benchmarks/harness.py)
import relay  # noqa: E402  (benchmarks/relay.py)
import run as bench  # noqa: E402  (benchmarks/run.py)
from server import farm_toml  # noqa: E402  (benchmarks/server.py)

SYSCALLS = {
    "write": "kernel: write (replies)",
    "read": "kernel: read",
    "accept4": "kernel: connection set-up/tear-down",
    "close": "kernel: connection set-up/tear-down",
    "setsockopt": "kernel: connection set-up/tear-down",
    "getsockname": "kernel: connection set-up/tear-down",
    "getpeername": "kernel: connection set-up/tear-down",
    "epoll_ctl": "kernel: connection set-up/tear-down",
    "io_uring_enter": "kernel: connection set-up/tear-down",
    "futex": "kernel: other",
    "syscall": "kernel: other",
    "sendto": "kernel: other",
    "recvfrom": "kernel: other",
}
#: Waiting, not working: the loop's poll, a sleep, a lock or condition wait.
IDLE = {
    "epoll_pwait",
    "epoll_wait",
    "clock_nanosleep",
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "__futex_abstimed_wait_common",
    "__futex_abstimed_wait_common64",
    "do_futex_wait",
    "sem_wait",
    "sem_clockwait",
}
#: (pattern in a frame's file, part), innermost match wins.
MODULES = [
    (re.compile(r"farm/(logs|smtp/logline)\.py"), "python: log lines"),
    (re.compile(r"farm/(limits|supervisor/anvil|supervisor/shared_lock)\.py"), "python: limits"),
    (re.compile(r"farm/metrics\.py"), "python: metrics"),
    (re.compile(r"farm/smtp/framing\.py"), "python: framer"),
    (re.compile(r"farm/relay(\w*\.py|/)"), "python: relay handler"),
    (re.compile(r"farm/smtp/"), "python: engine (farm/smtp)"),
    (re.compile(r"(WorkerServer|AcceptGate)\.\w+ \(farm/supervisor/worker\.py"), "python: worker"),
    (re.compile(r"logging/__init__\.py"), "python: log lines"),
]


def classify(stack: list[str]) -> str | None:
    """The part a sample counts for (None: idle)."""
    leaf = stack[-1].split(" (", 1)[0]
    if leaf in IDLE or leaf.startswith("0x"):  # (an unnamed libc frame: a futex wait)
        return None
    if leaf in SYSCALLS:
        return SYSCALLS[leaf]
    if any("LogWriter._run" in frame for frame in stack):
        return "log flusher thread (formats and writes the lines)"
    for frame in reversed(stack):
        for pattern, part in MODULES:
            if pattern.search(frame):
                return part
    return "uvloop/libuv and the interpreter"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--workload", choices=("per-conn", "long"), default="per-conn")
    parser.add_argument(
        "--profile", choices=("production", "nolog", "nolimits", "bare"), default="production"
    )
    parser.add_argument("--relay", action="store_true", help="profile the relay, not Sink")
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--keep", type=Path, help="keep py-spy's raw samples in this file")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy not found (pip install py-spy; it is in the bench extra)")
    workload = next(w for w in bench.WORKLOADS if w.key == args.workload)
    ctx = bench.Context(bench.find_smtp_source(), bench.SESSIONS, bench.MSG_SIZE)
    with tempfile.TemporaryDirectory(prefix="farm-profile-") as tmp:
        workdir = Path(tmp)
        sink = None
        if args.relay:
            sink = relay.Sink(workdir).__enter__()
            server: harness.Server = relay.RelayFarm(workdir, 1, sink.port, True, args.profile)
        else:
            server = ProfiledFarm(workdir, args.profile)
        try:
            with server:
                warm = bench.smtp_source(ctx, server.port, workload, workload.warmup, count=True)
                bench.check_run(server, workload, workload.warmup, warm, counted=True)
                [worker] = server.children.values()
                raw = workdir / "profile.txt"
                spying = subprocess.Popen(
                    [
                        *(spy, "record", "--native", "-r", str(args.rate), "-f", "raw"),
                        *("-o", str(raw), "-p", str(worker.pid)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1.0)  # py-spy attaches
                cpu0, sys0 = server.cpu_seconds()
                proc = bench.smtp_source(ctx, server.port, workload, args.messages, count=False)
                cpu1, sys1 = server.cpu_seconds()
                cpu, kernel = cpu1 - cpu0, sys1 - sys0
                spying.send_signal(2)
                spying.wait(30)
                bench.check_run(server, workload, args.messages, proc, counted=False)
        finally:
            if sink is not None:
                sink.stop()
        if args.keep is not None:
            shutil.copyfile(raw, args.keep)
        parts: collections.Counter[str] = collections.Counter()
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            part = classify(stack.split(";"))
            if part is not None:
                parts[part] += int(count)
    what = "farm.relay:Relay" if args.relay else "farm.handlers:Sink"
    print(
        f"farm serve -w 1 ({args.profile}, {what}), {workload.title}, {args.messages} msgs: "
        f"{cpu * 1e6 / args.messages:.0f} CPU µs/msg, of which {kernel * 1e6 / args.messages:.0f} "
        f"in the kernel (psutil; under py-spy); load {os.getloadavg()[0]:.2f}\n"
    )
    for title, seconds, selected in (
        ("user space (py-spy samples outside system calls)", cpu - kernel, False),
        ("kernel (py-spy samples in system calls; shares only)", kernel, True),
    ):
        mine = {part: n for part, n in parts.items() if part.startswith("kernel") == selected}
        total = sum(mine.values()) or 1
        print(f"{title}: {seconds * 1e6 / args.messages:.1f} µs/msg\n")
        print("| part | share | µs/msg |\n|---|---:|---:|")
        for part, count in sorted(mine.items(), key=lambda item: -item[1]):
            share = count / total
            print(f"| {part} | {share * 100:.1f}% | {share * seconds * 1e6 / args.messages:.1f} |")
        print()
    return 0


class ProfiledFarm(harness.Server):
    """``farm serve -w 1`` with Sink and a profile's settings (readiness, CPU, stop: harness.py)."""

    def __init__(self, workdir: Path, profile: str) -> None:
        super().__init__("farm-1w", workdir)
        self.profile = profile
        self.workers = 1
        self.config = farm_toml(workdir, f"profile-{profile}", profile)

    def __enter__(self) -> ProfiledFarm:
        cmd = [sys.executable, "-m", "farm", "serve", "-c", str(self.config), "-b"]
        cmd += ["127.0.0.1:0", "-w", "1", "--handler", "farm.handlers:Sink"]
        self.start_farm(cmd, {"PYTHONPATH": str(harness.ROOT)})
        return self


if __name__ == "__main__":
    sys.exit(main())
