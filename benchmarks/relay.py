"""Relay throughput: smtp-source to smtp-sink directly, and through ``farm serve`` relaying.

Usage: ``.venv/bin/python benchmarks/relay.py [--messages N] [--reps N] [--workers 1,2]
[--workloads per-conn,long] [--uvloop | --no-uvloop]``

One ``smtp-sink`` (Postfix's C test server, no dump: it throws the mail away) listens on a free
loopback port for the whole run. For every repetition and workload, each mode is measured once,
the order rotated each repetition so that drift hits all alike:

* ``direct``: ``smtp-source -s 20 -l 1024 -m N`` straight at the sink;
* ``farm-Nw``: a fresh ``farm serve -w N`` with ``handler = "farm.relay:Relay"``,
  ``next_hop`` the sink, ``domains = ["bench.test"]``, and the same smtp-source load at it.
  The farm answers 250 only once the sink has accepted the message. How many SMTP sessions
  with the sink that took (one per message, or fewer with connection reuse) is reported too:
  the sink's session counter over the run, per message.

Every run (a short warm-up too) is checked: smtp-source must exit 0 with nothing on stderr and
its ``-c`` counter must end at the message count, and the sink's own counter must have grown
by exactly that count (so each message really reached the sink); anything else is an error,
not a figure. Reported per workload: msgs/s (median over the repetitions), the ratio of each
farm's msgs/s to direct's, and the farm's CPU µs/msg (supervisor + all its workers, as
``run.py --farm`` measures it). The table is printed and written to
``benchmarks/results/relay.md`` (raw samples in ``relay.json``). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import harness  # benchmarks/harness.py (it puts benchmarks/ on sys.path)
from harness import (
    MSG_SIZE,
    NOISY,
    ROOT,
    SESSIONS,
    WORKLOADS,
    BenchError,
    Workload,
    busy_cpu,
    children_cpu,
    process_cpu,
)
from server import MESSAGE_LINE, farm_toml  # benchmarks/server.py

DOMAIN = "bench.test"
SENDER = f"sender@{DOMAIN}"
RECIPIENT = f"rcpt@{DOMAIN}"
DIRECT = "direct"
#: (mode, workload) -> the share of direct's msgs/s it should reach.
TARGET = {("farm-2w", "per-conn"): 0.6}

#: ``farm serve`` from this checkout, as ``python -m farm serve`` (no allocator step).
LAUNCHER = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from farm.cli import main; sys.exit(main(sys.argv[1:]))"
)


@dataclass
class Sample(harness.Rates):
    mode: str
    workload: str
    rep: int
    messages: int
    wall_s: float
    #: The farm's CPU seconds (supervisor + workers); 0 for direct.
    farm_cpu_s: float = 0.0
    #: CPU seconds every process but the farm, smtp-source and smtp-sink used meanwhile.
    other_cpu_s: float = 0.0
    #: SMTP sessions with the sink that ended during the run (direct: smtp-source's).
    sink_sessions: int = 0
    #: farm: CPU seconds of the supervisor, then each worker (busiest first).
    split_cpu_s: list[float] = field(default_factory=list)
    #: CPU seconds smtp-source and smtp-sink used (the load and the next hop).
    load_cpu_s: float = 0.0
    #: CPU seconds the whole machine was busy (all cores summed).
    busy_cpu_s: float = 0.0

    @property
    def cpu_s(self) -> float:
        return self.farm_cpu_s


# -- processes -----------------------------------------------------------------------------


class Sink:
    """``smtp-sink -c`` on a free loopback port; its message counter; stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.out_path = workdir / "smtp-sink.out"
        self.err_path = workdir / "smtp-sink.err"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> Sink:
        self.proc, self.port = harness.start_sink(self.out_path, self.err_path)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stderr(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.err_path.read_text(errors="replace").strip()
        return ""

    def counters(self) -> tuple[int, int]:
        """(sessions ended, messages received) so far: ``-c`` writes ``sess=N quit=N mesg=N``
        whenever they change."""
        with self.out_path.open("rb") as out:
            out.seek(max(0, self.out_path.stat().st_size - 4096))
            found = re.findall(rb"sess=(\d+) quit=\d+ mesg=(\d+)", out.read())
        return (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)

    def messages(self) -> int:
        return self.counters()[1]

    def wait_messages(self, expected: int, timeout: float = 10.0) -> int:
        """The counter once it reaches ``expected`` (or its value after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while (count := self.messages()) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return count

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError(f"smtp-sink died:\n{self.stderr()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        harness.stop_process(proc)


class RelayFarm(harness.Server):
    """``farm serve -w N`` relaying to the sink; readiness, CPU and stop from harness.Server."""

    def __init__(
        self, workdir: Path, workers: int, sink_port: int, uvloop: bool, profile: str
    ) -> None:
        super().__init__(f"farm-{workers}w", workdir)
        self.workers = workers
        self.uvloop = uvloop
        self.profile = profile
        self.name = f"relay-{workers}w"
        self.log_path = workdir / f"{self.name}.log"
        self.log_path.unlink(missing_ok=True)
        handler = f'[handler_args]\nnext_hop = "127.0.0.1:{sink_port}"\ndomains = ["{DOMAIN}"]\n'
        self.config = farm_toml(workdir, self.name, profile, handler)
        self.config.write_text('handler = "farm.relay:Relay"\n' + self.config.read_text())

    def log_messages(self) -> int | None:
        if self.profile not in ("production", "nolimits"):
            return None
        try:
            return len(MESSAGE_LINE.findall(self.log_path.read_bytes()))
        except FileNotFoundError:
            return 0

    def __enter__(self) -> RelayFarm:
        cmd = [sys.executable, "-c", LAUNCHER, str(ROOT), "serve"]
        cmd += ["-c", str(self.config), "-b", "127.0.0.1:0", "-w", str(self.workers)]
        cmd += ["--uvloop" if self.uvloop else "--no-uvloop"]
        self.start_farm(cmd)
        self.handler = f"farm.relay:Relay (farm serve -w {self.workers})"
        return self


def checked_run(
    program: str,
    mode: str,
    port: int,
    workload: Workload,
    messages: int,
    sink: Sink,
    farm: RelayFarm | None,
    measure: bool,
) -> Sample:
    """One smtp-source run, verified end to end; the sample (CPU figures only if ``measure``)."""
    sessions0, sink0 = sink.counters()
    cpu0, split0, busy0, client0 = (0.0, 0.0), {}, busy_cpu(), children_cpu()
    sink_cpu0 = _cpu(sink)
    if farm is not None and measure:
        cpu0 = farm.cpu_seconds()
        split0 = dict(farm.per_process)
    t0 = time.perf_counter()
    proc = harness.smtp_source(
        program, port, workload, messages, count=True, sender=SENDER, recipient=RECIPIENT
    )
    t1 = time.perf_counter()
    sample = Sample(mode, workload.key, 0, messages, t1 - t0)
    if farm is not None and measure:
        cpu1 = farm.cpu_seconds()
        sample.farm_cpu_s = cpu1[0] - cpu0[0]
        split = {pid: cpu - split0.get(pid, 0.0) for pid, cpu in farm.per_process.items()}
        sample.split_cpu_s = [split.pop(farm.ps.pid), *sorted(split.values(), reverse=True)]
    sample.busy_cpu_s = busy_cpu() - busy0
    sample.load_cpu_s = (children_cpu() - client0) + (_cpu(sink) - sink_cpu0)
    sample.other_cpu_s = max(0.0, sample.busy_cpu_s - sample.farm_cpu_s - sample.load_cpu_s)

    problem = harness.source_problem(proc, messages, counted=True)
    if problem:
        problem = f"smtp-source: {problem}"
    else:
        received = sink.wait_messages(sink0 + messages) - sink0
        if received != messages:
            problem = f"the sink received {received} messages"
        sample.sink_sessions = sink.counters()[0] - sessions0
    if problem:
        where = f"\nfarm stderr: {farm.stderr()[-2000:]}" if farm is not None else ""
        raise BenchError(
            f"{mode} / {workload.title}: {problem}, expected {messages}\n"
            f"smtp-source stderr: {proc.stderr.strip()[-2000:]}\n"
            f"sink stderr: {sink.stderr()[-1000:]}{where}"
        )
    sink.check_alive()
    if farm is not None and farm.proc is not None and farm.proc.poll() is not None:
        raise BenchError(f"{mode} died during the run:\n{farm.stderr()}")
    return sample


def _cpu(sink: Sink) -> float:
    """smtp-sink's user+sys CPU seconds so far (it is not this process's waited-for child)."""
    return 0.0 if sink.proc is None else process_cpu(sink.proc.pid)


def measure(
    program: str,
    mode: str,
    workload: Workload,
    messages: int,
    sink: Sink,
    workdir: Path,
    uvloop: bool,
    profile: str,
) -> Sample:
    """Warm up, then measure, ``mode`` under ``workload`` (a fresh farm for each sample)."""
    if mode == DIRECT:
        checked_run(program, mode, sink.port, workload, workload.warmup, sink, None, False)
        return checked_run(program, mode, sink.port, workload, messages, sink, None, True)
    workers = int(mode.removeprefix("farm-").removesuffix("w"))
    with RelayFarm(workdir, workers, sink.port, uvloop, profile) as farm:
        checked_run(program, mode, farm.port, workload, workload.warmup, sink, farm, False)
        sample = checked_run(program, mode, farm.port, workload, messages, sink, farm, True)
    logged = farm.log_messages()  # after the graceful stop: every line is written by now
    if logged is not None and logged != workload.warmup + messages:
        raise BenchError(
            f"{mode}: {logged} message lines in its log, not {workload.warmup + messages}"
        )
    return sample


def _measured(run: tuple[Any, ...], rep: int) -> Sample:
    sample = measure(*run)
    sample.rep = rep
    return sample


# -- report --------------------------------------------------------------------------------


def render(
    samples: list[Sample],
    workloads: list[Workload],
    modes: list[str],
    messages: int,
    reps: int,
    uvloop: bool,
    elapsed: float,
    profile: str = "production",
) -> str:
    farms = [m for m in modes if m != DIRECT]
    loop = "uvloop" if uvloop else "asyncio"
    head = ["Workload", "direct msgs/s"]
    for mode in farms:
        head += [f"farm -w{mode[5:-1]} msgs/s", "x direct"]
    head += [f"farm -w{mode[5:-1]} CPU µs/msg" for mode in farms]
    lines = [
        "# Relay throughput: smtp-source to smtp-sink, directly and through the farm",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} · {harness.versions()}",
        "",
        f"`smtp-source -s {SESSIONS} -l {MSG_SIZE} -m {messages} -c -f {SENDER} -t {RECIPIENT}` "
        "against `smtp-sink -c 127.0.0.1:PORT 256` (direct), or against `farm serve -w N` "
        f'({loop}) with `handler = "farm.relay:Relay"`, `next_hop` = the sink, '
        f'`domains = ["{DOMAIN}"]` (250 only once the sink has accepted), '
        + (
            "as in production: INFO log to a file, per-client limits applying to the "
            "benchmark's client (benchmarks/server.py farm_toml). "
            if profile == "production"
            else f"profile `{profile}` (not the production settings: see farm_toml). "
        )
        + f"{reps} run(s) per cell, modes interleaved; msgs/s: median (min-max); x direct: "
        "farm msgs/s ÷ direct msgs/s; CPU µs/msg: supervisor + workers user+sys time per "
        "message, median. Every run verified: smtp-source's counter and the sink's both "
        "reached the message count.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for workload in workloads:
        mine = {
            m: [s for s in samples if s.workload == workload.key and s.mode == m] for m in modes
        }
        if not all(mine.values()):
            continue
        rate = {m: statistics.median(s.msgs_per_s for s in mine[m]) for m in modes}
        cells = [f"{workload.title}, {messages} msgs", _rate(mine[DIRECT])]
        for mode in farms:
            ratio = rate[mode] / rate[DIRECT]
            goal = TARGET.get((mode, workload.key))
            mark = f" (target >= {goal}x {'✅' if ratio >= goal else '❌'})" if goal else ""
            cells += [_rate(mine[mode]), f"{ratio:.2f}x{mark}"]
        cells += [f"{statistics.median(s.cpu_us_per_msg for s in mine[m]):.0f}" for m in farms]
        lines.append("| " + " | ".join(cells) + " |")
    other = [s.other_cpu_s / s.wall_s * 100 for s in samples]
    lines += [
        "",
        f"Other processes' CPU during the measured runs: median {statistics.median(other):.0f}% "
        f"of a core, at most {max(other):.0f}%"
        + (
            " - the machine was not quiet, the figures are suspect."
            if max(other) > NOISY * 100
            else "."
        ),
        "Sink sessions ended per message during the measured runs, median: "
        + "; ".join(
            f"{workload.key} "
            + ", ".join(
                f"{mode} {statistics.median(s.sink_sessions / s.messages for s in mine):.2f}"
                for mode in modes
                if (mine := [s for s in samples if s.workload == workload.key and s.mode == mode])
            )
            for workload in workloads
        )
        + ".",
        *_split_lines(samples, workloads, farms),
        *_budget_lines(samples, workloads),
        f"Total benchmark time {elapsed:.0f}s.",
        "",
    ]
    return "\n".join(lines)


def _rate(samples: list[Sample]) -> str:
    rates = [s.msgs_per_s for s in samples]
    spread = f" ({min(rates):,.0f}-{max(rates):,.0f})" if len(rates) > 1 else ""
    return f"{statistics.median(rates):,.0f}{spread}"


def _split_lines(samples: list[Sample], workloads: list[Workload], farms: list[str]) -> list[str]:
    cells = []
    for workload in workloads:
        for mode in farms:
            mine = [s for s in samples if s.workload == workload.key and s.mode == mode]
            if mine and all(s.farm_cpu_s for s in mine):
                cells.append(harness.split_cell(f"{mode} {workload.key}", mine))
    if not cells:
        return []
    return ["Farm CPU split, supervisor / each worker (busiest first): " + "; ".join(cells) + "."]


def _budget_lines(samples: list[Sample], workloads: list[Workload]) -> list[str]:
    """What a target leaves the farm: the CPU the machine had busy in the direct runs, spread
    over the target's rate, less what smtp-source and smtp-sink spend per message through it."""
    lines = []
    for (mode, key), goal in TARGET.items():
        direct = [s for s in samples if s.workload == key and s.mode == DIRECT]
        farm = [s for s in samples if s.workload == key and s.mode == mode]
        if not direct or not farm:
            continue
        cores = statistics.median(s.busy_cpu_s / s.wall_s for s in direct)
        rate = goal * statistics.median(s.msgs_per_s for s in direct)
        load = statistics.median(s.load_cpu_s * 1e6 / s.messages for s in farm)
        spent = statistics.median(s.cpu_us_per_msg for s in farm)
        lines.append(
            f"CPU budget of {mode} {key} at its target ({goal}x direct = {rate:,.0f} msgs/s): "
            f"direct kept {cores:.2f} cores busy, {cores * 1e6 / rate:.0f} µs per message at "
            f"that rate, of which smtp-source and smtp-sink take {load:.0f} "
            f"(their CPU per message through the farm), leaving the farm "
            f"{cores * 1e6 / rate - load:.0f} µs per message; it spent {spent:.0f}."
        )
    return lines


def report_sample(sample: Sample, reps: int, note: str = "") -> None:
    farm = (
        f" farm {sample.cpu_us_per_msg:5.0f} µs/msg ({sample.farm_cpu_s:5.2f}s cpu)"
        if sample.mode != DIRECT
        else ""
    )
    print(
        f"rep {sample.rep + 1}/{reps} {sample.workload:8} {sample.mode:7} "
        f"{sample.msgs_per_s:8,.0f} msgs/s (wall {sample.wall_s:5.2f}s){farm} "
        f"others {sample.other_cpu_s:4.2f}s cpu {note}".rstrip(),
        file=sys.stderr,
        flush=True,
    )


# -- main ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--messages", type=int, default=16000, help="messages per measured run (default 16000)"
    )
    parser.add_argument("--reps", type=int, default=3, help="runs per cell (median reported)")
    parser.add_argument(
        "--workers", default="1,2", help="comma-separated farm worker counts (default 1,2)"
    )
    parser.add_argument(
        "--workloads",
        default=",".join(w.key for w in WORKLOADS),
        help="comma-separated subset of " + ",".join(w.key for w in WORKLOADS),
    )
    parser.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the farm's event loop (default: uvloop, as farm serve's own default)",
    )
    parser.add_argument(
        "--retry-budget",
        type=float,
        default=120,
        help="re-run a sample disturbed by other processes only during the first S seconds",
    )
    parser.add_argument(
        "--profile",
        choices=("production", "nolog", "nolimits", "bare"),
        default="production",
        help="farm settings (benchmarks/server.py farm_toml): production = INFO log to a file "
        "and per-client limits applying to the benchmark's client (default); the others take "
        "the log (nolog), the limits (nolimits) or both (bare) away, for comparison",
    )
    parser.add_argument("--no-save", action="store_true", help="don't write results/relay.*")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    try:
        workers = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        parser.error(f"--workers: not a list of numbers: {args.workers!r}")
    if not workers or min(workers) < 1:
        parser.error("--workers: give one or more counts >= 1")
    messages = max(SESSIONS, round(args.messages / SESSIONS) * SESSIONS)  # whole sessions
    keys = [k for k in args.workloads.split(",") if k]
    workloads = [w for w in WORKLOADS if w.key in keys]
    if not workloads or len(workloads) != len(set(keys)):
        parser.error(f"--workloads: a subset of {','.join(w.key for w in WORKLOADS)}")
    modes = [DIRECT, *dict.fromkeys(f"farm-{n}w" for n in workers)]

    program = harness.find_smtp_source()
    started = time.monotonic()
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="farm-bench-relay-") as tmp:
        workdir = Path(tmp)
        try:
            with Sink(workdir) as sink:
                for rep in range(args.reps):
                    order = modes[rep % len(modes) :] + modes[: rep % len(modes)]
                    for workload in workloads:
                        for mode in order:
                            run = (
                                program,
                                *(mode, workload, messages, sink, workdir),
                                *(args.uvloop, args.profile),
                            )
                            sample = harness.quietest(
                                lambda: _measured(run, rep),  # noqa: B023
                                lambda s, note: report_sample(s, args.reps, note),
                                started,
                                args.retry_budget,
                            )
                            samples.append(sample)
        except BenchError as error:
            print(f"benchmark failed: {error}", file=sys.stderr)
            return 1
    elapsed = time.monotonic() - started
    table = render(
        samples, workloads, modes, messages, args.reps, args.uvloop, elapsed, args.profile
    )
    print(table)
    if not args.no_save:
        meta = {
            "messages": messages,
            "sessions": SESSIONS,
            "size": MSG_SIZE,
            "loop": "uvloop" if args.uvloop else "asyncio",
            "profile": args.profile,
        }
        runs = [replace(w, messages=messages) for w in workloads]
        harness.save_results("relay", table, meta, runs, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
