"""System calls and page faults per message of a ``farm serve -w 1`` worker (or a reference).

Usage: ``.venv/bin/python benchmarks/syscalls.py [--profile production|nolog|nolimits|bare]
[--messages N] [--workload per-conn|long] [--handler sink|relay] [--server farm|aiosmtpd|floor]``
(run it from outside the checkout with ``PYTHONPATH`` set to the tree to measure, as
``instructions.py``).

The kernel's share of a message's CPU (about a third of ``farm serve -w 1``'s in ``make
bench``) is set by the system calls the worker makes and the page faults it takes, so this
counts them: the server runs at the benchmark's settings, takes ``smtp-source``'s warm-up, then
``strace -c -f`` is attached to it for a run of N messages (``-s 20 -l 1024``, one message per
connection unless ``--workload long``). Printed: each system call's count per message, and the
minor page faults per message (``/proc/PID/stat``, read around the same run). strace slows the
server several times, so its timers (the log's 100 ms flush, heartbeats) fire for more messages
than at full speed: their calls are over-counted here, if anything. ``--server aiosmtpd``:
``make bench``'s CPU reference instead; ``--server floor``: ``floor.py``'s canned replies.
Needs ``strace``, ``smtp-source`` (Debian: strace, postfix).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402  (benchmarks/harness.py)
from instructions import (  # noqa: E402  (benchmarks/instructions.py)
    READY_WITHIN,
    REFERENCES,
    WARMUP,
    reference_argv,
    reference_port,
    run_options,
    wait_greeting,
    worker_argv,
    worker_config,
)

SOURCE = ["-s", "20", "-l", "1024", "-f", "s@bench.test", "-t", "r@bench.test"]


def minor_faults(pid: int) -> int:
    """The process's minor page faults so far (field 10 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])


def traced_run(pid: int, port: int, messages: int, long: bool, out: Path) -> int:
    """``messages`` sent with strace -c attached to ``pid``; the minor faults they took."""
    source = [harness.find_smtp_source(), *SOURCE, *(["-d"] if long else [])]
    subprocess.run([*source, "-m", str(WARMUP), f"127.0.0.1:{port}"], check=True)
    strace = subprocess.Popen(
        ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert strace.stderr is not None
        attached = strace.stderr.readline()  # "strace: Process PID attached"
        if "attached" not in attached:
            raise SystemExit(f"strace did not attach to {pid}: {attached.strip()}")
        before = minor_faults(pid)
        subprocess.run([*source, "-m", str(messages), f"127.0.0.1:{port}"], check=True)
        faults = minor_faults(pid) - before
    finally:
        strace.send_signal(signal.SIGINT)
        strace.wait(60)
    return faults


def strace_counts(summary: Path) -> dict[str, int]:
    """``strace -c``'s table: system call -> calls."""
    counts: dict[str, int] = {}
    for line in summary.read_text().splitlines():
        fields = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"
        if len(fields) in (5, 6) and fields[0][0].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def measure(
    args: argparse.Namespace, workdir: Path, stack: ExitStack
) -> tuple[dict[str, int], int]:
    """Start the server asked for, run the traced messages; (calls, minor faults)."""
    messages, long = args.messages, args.workload == "long"
    out = workdir / "strace.txt"
    if args.server in REFERENCES:
        portfile = workdir / "port"
        server = start(reference_argv(portfile, REFERENCES[args.server]), workdir, stack)
        port = reference_port(server, portfile, workdir / "stderr")
        pid = server.pid
    else:
        config, spec = worker_config(workdir, args.profile, args.handler, stack)
        port = harness.free_port()
        farm = start(worker_argv(config, port, spec), workdir, stack)
        wait_greeting(port, time.monotonic() + READY_WITHIN)
        [worker] = psutil.Process(farm.pid).children()
        pid = worker.pid
    faults = traced_run(pid, port, messages, long, out)
    return strace_counts(out), faults


def start(argv: list[str], workdir: Path, stack: ExitStack) -> subprocess.Popen[bytes]:
    """``argv`` started in ``workdir`` (stderr to a file there), stopped by PID with ``stack``."""
    with (workdir / "stderr").open("wb") as err:
        proc = subprocess.Popen(argv, cwd=workdir, stdout=subprocess.DEVNULL, stderr=err)
    stack.callback(harness.stop_process, proc)
    return proc


def main() -> int:
    args = run_options(__doc__.splitlines()[0], messages=2000).parse_args()
    with tempfile.TemporaryDirectory(prefix="farm-syscalls-") as tmp, ExitStack() as stack:
        counts, faults = measure(args, Path(tmp), stack)
    n = args.messages
    what = args.server if args.server in REFERENCES else f"farm {args.profile} {args.handler}"
    print(f"{what}, {args.workload}, {n} messages: per message")
    for name, calls in sorted(counts.items(), key=lambda item: -item[1]):
        print(f"  {calls / n:7.2f}  {name}")
    print(f"  {sum(counts.values()) / n:7.2f}  system calls in all")
    print(f"  {faults / n:7.2f}  minor page faults")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
