"""User-space instructions per message of a ``farm serve -w 1`` worker, under callgrind.

Usage: ``.venv/bin/python benchmarks/instructions.py [--profile production|nolog|nolimits|bare]
[--messages N] [--workload per-conn|long] [--handler sink|relay] [--server farm|aiosmtpd]``;
compare two trees by running it with ``PYTHONPATH`` set to each (the tree's own ``farm`` is
the one run). A tree must be built as the checkout is (``farm/compiled.py``'s modules
compiled), or it runs them as Python: install a tree's build with ``pip install --no-deps
--target DIR TREE`` and set ``PYTHONPATH=DIR``.

CPU time on a shared 2-core machine moves by several percent between runs; the instructions a
worker executes do not, so small changes to the per-message path can be measured here, on the
real worker with the benchmark's settings (``server.py farm_toml``: by default production, INFO
log to a file and limits applying to the client). ``farm serve -w 1`` runs under ``valgrind
--tool=callgrind`` twice, taking N and then 3N messages from ``smtp-source -s 20 -l 1024``
(one message per connection, or ``-d`` for long sessions) after the same warm-up; the worker's
total instructions at exit differ by the 2N messages only (start-up and stop cancel). Repeat
runs agree within about 0.5 %; valgrind slows the worker ~50x, so its timers (the log's 100 ms
flush, the limiter's batched closes) fire for fewer messages than at full speed.
``--server aiosmtpd``: the same two runs against the CPU reference of ``make bench`` instead
(``server.py aiosmtpd-asyncio``: aiosmtpd 1.4.6 and its ``Sink``, one process, asyncio, WARNING
log, warm allocator), so that the ratio of the two is free of the host's noise too (user space
only: the kernel's share, about the same per message for both, is not in either count);
``--server floor``: ``floor.py``'s canned replies on uvloop (what any Python server pays).
``--handler relay``: the worker runs ``farm.relay:Relay`` (as ``make bench-relay`` does) with an
``smtp-sink`` as its next hop, started and stopped here. Needs ``valgrind``, ``smtp-source`` and
``smtp-sink`` (Debian: valgrind, postfix); about 30 s per profile. ``--simulate``: callgrind
also simulates the caches and branch predictors (``--cache-sim=yes --branch-sim=yes``; this VM
exposes no hardware counters) and the misses per message are printed too: how dear the
instructions are, not only how many (slower, about 2 min).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402  (benchmarks/harness.py)
from harness import free_port  # noqa: E402
from server import farm_toml  # noqa: E402  (benchmarks/server.py)

#: Generous: Python starts ~50x slower under valgrind.
READY_WITHIN = 600.0
WARMUP = 100
#: callgrind's events with ``--simulate`` (besides ``Ir``, the instructions), as printed.
SIMULATED = {
    "I1mr": "L1 instruction-cache misses",
    "D1mr": "L1 data-cache read misses",
    "Bcm": "mispredicted conditional branches",
    "Bim": "mispredicted indirect branches",
}


def wait_greeting(port: int, deadline: float) -> None:
    """Until 127.0.0.1:port answers 220 (a SystemExit after ``deadline``)."""
    while not harness.greets(port, timeout=120):
        if time.monotonic() > deadline:
            raise SystemExit(f"the server did not greet on port {port} within {READY_WITHIN}s")
        time.sleep(0.5)


@contextmanager
def under_callgrind(
    workdir: Path, argv: list[str], simulate: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` run under callgrind, its output files and stderr in ``workdir`` (also its cwd:
    not the checkout, whose ``farm`` ``-m farm`` would import before PYTHONPATH's);
    terminated and waited for on leaving. ``simulate``: with the cache and branch simulation."""
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/callgrind.%p"]
    if simulate:
        command += ["--cache-sim=yes", "--branch-sim=yes"]
    with (workdir / "stderr").open("wb") as err:
        proc = subprocess.Popen(
            [*command, *argv], cwd=workdir, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(READY_WITHIN)


def send_messages(port: int, messages: int, long: bool) -> None:
    """smtp-source's warm-up, then ``messages`` (``-d``: long sessions), to 127.0.0.1:port."""
    source = ["smtp-source", "-s", "20", "-l", "1024"]
    source += ["-f", "s@bench.test", "-t", "r@bench.test", *(["-d"] if long else [])]
    subprocess.run([*source, "-m", str(WARMUP), f"127.0.0.1:{port}"], check=True)
    subprocess.run([*source, "-m", str(messages), f"127.0.0.1:{port}"], check=True)


def worker_config(workdir: Path, profile: str, handler: str, stack: ExitStack) -> tuple[Path, str]:
    """The farm.toml and ``--handler`` of a measured worker; for ``relay``, an ``smtp-sink``
    next hop started here and stopped (by PID) when ``stack`` closes."""
    if handler != "relay":
        return farm_toml(workdir, "farm", profile), "farm.handlers:Sink"
    sink, sink_port = harness.start_sink(None, workdir / "smtp-sink.err")
    stack.callback(harness.stop_process, sink)
    relay = f'[handler_args]\nnext_hop = "127.0.0.1:{sink_port}"\ndomains = ["bench.test"]\n'
    return farm_toml(workdir, "farm", profile, relay), "farm.relay:Relay"


def worker_instructions(
    profile: str, messages: int, long: bool, handler: str = "sink", simulate: bool = False
) -> dict[str, int]:
    """The worker's callgrind totals (``Ir``: user-space instructions) for a run of
    ``messages`` (after warm-up); ``handler``: ``sink`` (farm.handlers:Sink) or ``relay``
    (farm.relay:Relay to smtp-sink)."""
    with tempfile.TemporaryDirectory(prefix="farm-instructions-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        config, handler_spec = worker_config(workdir, profile, handler, stack)
        port = free_port()
        argv = worker_argv(config, port, handler_spec)
        with under_callgrind(workdir, argv, simulate) as farm:
            wait_greeting(port, time.monotonic() + READY_WITHIN)
            [worker] = psutil.Process(farm.pid).children()
            send_messages(port, messages, long)
        return callgrind_totals(workdir / f"callgrind.{worker.pid}")


def reference_instructions(
    kind: str, messages: int, long: bool, simulate: bool = False
) -> dict[str, int]:
    """A ``server.py KIND``'s callgrind totals for a run of ``messages`` (after warm-up)."""
    with tempfile.TemporaryDirectory(prefix="farm-instructions-") as tmp:
        workdir = Path(tmp)
        portfile = workdir / "port"
        with under_callgrind(workdir, reference_argv(portfile, kind), simulate) as server:
            port = reference_port(server, portfile, workdir / "stderr")
            send_messages(port, messages, long)
        return callgrind_totals(workdir / f"callgrind.{server.pid}")


def worker_argv(config: Path, port: int, handler_spec: str) -> list[str]:
    """``farm serve -w 1`` on 127.0.0.1:port (run from a directory outside the checkout)."""
    argv = [sys.executable, "-m", "farm", "serve", "-c", str(config), "-b"]
    return [*argv, f"127.0.0.1:{port}", "-w", "1", "--handler", handler_spec]


#: --server: the ``server.py`` kinds measured instead of a farm worker.
REFERENCES = {"aiosmtpd": "aiosmtpd-asyncio", "floor": "floor-uvloop"}


def reference_argv(portfile: Path, kind: str = REFERENCES["aiosmtpd"]) -> list[str]:
    """The command of a ``server.py`` KIND, by default ``make bench``'s CPU reference."""
    return [sys.executable, str(HERE / "server.py"), kind, str(portfile)]


def reference_port(server: subprocess.Popen[bytes], portfile: Path, stderr: Path) -> int:
    """The port of a started ``server.py`` once it greets (a SystemExit if it does not)."""
    deadline = time.monotonic() + READY_WITHIN
    while not portfile.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start: {stderr.read_text()}")
        time.sleep(0.5)
    port = int(portfile.read_text().split()[0])  # "PORT PID MALLOC HANDLER"
    wait_greeting(port, deadline)
    return port


def callgrind_totals(path: Path) -> dict[str, int]:
    """A callgrind output file's totals by event (``Ir``: instructions)."""
    events: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            return dict(zip(events, map(int, line.split()[1:]), strict=True))
    raise SystemExit(f"no totals in {path}")


def run_options(description: str, messages: int = 300) -> argparse.ArgumentParser:
    """The options of a measure of the worker: --profile, --messages, --workload, --handler
    and --server."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--profile", choices=("production", "nolog", "nolimits", "bare"), default="production"
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=messages,
        help="N (instructions.py, bytecodes.py: the runs take N and 3N)",
    )
    parser.add_argument("--workload", choices=("per-conn", "long"), default="per-conn")
    parser.add_argument("--handler", choices=("sink", "relay"), default="sink")
    parser.add_argument(
        "--server",
        choices=("farm", *REFERENCES),
        default="farm",
        help="farm (a farm serve -w 1 worker, default), aiosmtpd (the CPU reference of make "
        "bench) or floor (floor.py's canned replies); --profile and --handler apply to farm",
    )
    return parser


def main() -> int:
    parser = run_options(__doc__.splitlines()[0])
    parser.add_argument(
        "--simulate", action="store_true", help="also the cache and branch-predictor misses"
    )
    args = parser.parse_args()
    long, simulate = args.workload == "long", args.simulate
    if args.server in REFERENCES:
        kind = REFERENCES[args.server]
        few = reference_instructions(kind, args.messages, long, simulate)
        more = reference_instructions(kind, 3 * args.messages, long, simulate)
        what = f"{kind}, {args.workload}"
    else:
        few = worker_instructions(args.profile, args.messages, long, args.handler, simulate)
        more = worker_instructions(args.profile, 3 * args.messages, long, args.handler, simulate)
        tree = os.environ.get("PYTHONPATH", "(installed farm)")
        what = f"{args.profile}, {args.workload}, {args.handler}, {tree}"
    per_message = {event: (more[event] - few[event]) / (2 * args.messages) for event in more}
    instructions = per_message["Ir"]
    print(f"{what}: {instructions / 1000:.1f}k instructions/msg")
    for event, name in SIMULATED.items() if simulate else ():
        misses = per_message[event]
        print(f"  {misses / 1000:.2f}k {name}/msg ({misses / instructions * 1000:.1f} per 1,000)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
