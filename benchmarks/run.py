"""Drive aiosmtpd and farm with Postfix's ``smtp-source``, side by side, and print a table.

Usage: ``.venv/bin/python benchmarks/run.py [--reps N] [--servers A,B] [--farm] [--quick]
[--profile KIND]``

For every repetition, workload and server (servers interleaved, their order rotated each
repetition so drift hits all alike) a fresh server process is started (``server.py``), warmed
up with a short ``smtp-source -c`` run whose counter must reach the message count, and then
measured with one ``smtp-source`` run: wall time, msgs/s, and the server process's CPU time
(user+sys, read just before and just after the run) per message. The best msgs/s and the
median CPU µs/msg over the repetitions go into a Markdown table, printed and written to
``benchmarks/results/latest.md`` (raw samples in ``latest.json``). See ``benchmarks/README.md``.

The ``farm-Nw`` kinds (not in the default set; ``--farm`` or ``--servers``) are the real
``farm serve`` with N workers: their CPU time is the supervisor's plus all its descendants'.
"""

from __future__ import annotations

import argparse
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import harness  # benchmarks/harness.py (it puts benchmarks/ on sys.path)
from harness import (
    FARM_SERVERS,
    MSG_SIZE,
    NOISY,
    RESULTS,
    ROOT,
    SESSIONS,
    SINK,
    BenchError,
    Server,
    Workload,
    busy_cpu,
    children_cpu,
    find_smtp_source,
    save_results,
)

#: Server kinds, in table order. The first is the baseline of the ratio column.
BASELINE = "aiosmtpd-asyncio"
#: What ``make bench`` runs: the baseline and the reference, farm serve as in production
#: (1 and 2 workers), the same without its INFO log and without limits (what each costs), and
#: the engine alone in one process (labelled "engine only").
SERVERS = [
    BASELINE,
    SINK,
    "farm-1w",
    "farm-2w",
    "farm-1w-nolog",
    "farm-1w-nolimits",
    "farm-uvloop",
]
#: The engine alone, one process, no supervisor (``--engine``): what earlier runs compared.
ENGINE_SET = ["aiosmtpd-asyncio", "aiosmtpd-uvloop", "farm-asyncio", "farm-uvloop"]
#: Servers only run when asked for: the engine counting into metrics (prices the metrics).
EXTRA_SERVERS = ["aiosmtpd-uvloop", "farm-asyncio", "farm-uvloop-stats", "floor-uvloop"]
ALL_SERVERS = SERVERS + EXTRA_SERVERS + [k for k in FARM_SERVERS if k not in SERVERS]
#: What ``--farm`` selects: the baseline, the reference and farm serve as in production.
FARM_SET = [BASELINE, SINK, "farm-1w", "farm-2w"]
#: CPU µs/msg relative to the baseline that each server should stay under (the engine-only
#: ones are the goals of the engine alone).
TARGETS = {"farm-1w": 0.3, "farm-asyncio": 0.5, "farm-uvloop": 0.2}
#: msgs/s relative to smtp-sink's that each server should reach.
RATE_TARGETS = {"farm-2w": 0.5}
#: (server, without, what it costs): CPU µs/msg of the first over the second, at most 1.10.
COSTS = [("farm-1w", "farm-1w-nolog", "the INFO log"), ("farm-1w", "farm-1w-nolimits", "limits")]
COST_TARGET = 1.10
#: Labels of the kinds that are not the product's production configuration.
LABELS = {
    "farm-uvloop": "engine only, 1 process, logging off",
    "farm-asyncio": "engine only, 1 process, logging off",
    "farm-uvloop-stats": "engine only + metrics",
    "floor-uvloop": "not a server: canned replies, the floor of Python on uvloop",
    "farm-1w-nolog": "logging off",
    "farm-1w-nolimits": "limits not applying",
    "farm-1w-bare": "logging off, limits not applying",
}

SENDER = "bench-sender@client.test"
RECIPIENT = "bench-rcpt@bench.test"


#: Messages per measured run: the per-conn workload is the slower one.
WORKLOADS = [
    replace(harness.WORKLOADS[0], messages=16000),
    replace(harness.WORKLOADS[1], messages=40000),
]


@dataclass
class Sample(harness.Rates):
    server: str
    workload: str
    rep: int
    messages: int
    wall_s: float
    server_cpu_s: float
    server_sys_s: float
    client_cpu_s: float
    #: CPU time every other process on the machine used meanwhile (noise from outside).
    other_cpu_s: float = 0.0
    #: farm serve: CPU seconds of the supervisor, then of each worker (busiest first).
    split_cpu_s: list[float] = field(default_factory=list)

    @property
    def cpu_s(self) -> float:
        return self.server_cpu_s


@dataclass
class Context:
    smtp_source: str
    sessions: int
    size: int
    malloc: str = "warm"
    handlers: dict[str, str] = field(default_factory=dict)
    malloc_states: set[str] = field(default_factory=set)


# -- processes -----------------------------------------------------------------------------


def smtp_source(
    ctx: Context, port: int, workload: Workload, messages: int, count: bool
) -> subprocess.CompletedProcess[str]:
    return harness.smtp_source(
        ctx.smtp_source,
        port,
        workload,
        messages,
        count=count,
        sender=SENDER,
        recipient=RECIPIENT,
        sessions=ctx.sessions,
        size=ctx.size,
    )


def check_run(
    server: Server,
    workload: Workload,
    messages: int,
    proc: subprocess.CompletedProcess[str],
    counted: bool,
) -> None:
    """The run must have gone through (see ``harness.source_problem``), the server be alive."""
    problem = harness.source_problem(proc, messages, counted)
    if problem:
        raise BenchError(
            f"{server.kind} / {workload.title}: smtp-source failed ({problem})\n"
            f"stdout: {proc.stdout[-500:]!r}\nstderr: {proc.stderr[-2000:]}\n"
            f"server stderr: {server.stderr()[-2000:]}"
        )
    if server.proc is not None and server.proc.poll() is not None:
        raise BenchError(f"{server.kind} died during the run:\n{server.stderr()}")


def measure(ctx: Context, kind: str, workload: Workload, rep: int, workdir: Path) -> Sample:
    (workdir / f"{kind}.log").unlink(missing_ok=True)
    server = Server(kind, workdir, ctx.malloc)
    with server:
        ctx.handlers[kind] = server.handler
        ctx.malloc_states.add(server.malloc_state)
        if workload.warmup:
            warm = smtp_source(ctx, server.port, workload, workload.warmup, count=True)
            check_run(server, workload, workload.warmup, warm, counted=True)
        busy0 = busy_cpu()
        client0 = children_cpu()
        cpu0 = server.cpu_seconds()
        split0 = dict(server.per_process)
        t0 = time.perf_counter()
        proc = smtp_source(ctx, server.port, workload, workload.messages, count=False)
        t1 = time.perf_counter()
        cpu1 = server.cpu_seconds()
        split = {pid: cpu - split0[pid] for pid, cpu in server.per_process.items()}
        client1 = children_cpu()
        busy1 = busy_cpu()
        check_run(server, workload, workload.messages, proc, counted=False)
    logged = server.log_messages()  # after the graceful stop: every line is written by now
    expected = workload.warmup + workload.messages
    if logged is not None and logged != expected:
        raise BenchError(f"{kind}: {logged} message lines in its log, not {expected}")
    return Sample(
        kind,
        workload.key,
        rep,
        workload.messages,
        t1 - t0,
        cpu1[0] - cpu0[0],
        cpu1[1] - cpu0[1],
        client1 - client0,
        max(0.0, (busy1 - busy0) - (cpu1[0] - cpu0[0]) - (client1 - client0)),
        [split.pop(server.ps.pid), *sorted(split.values(), reverse=True)] if split else [],
    )


# -- report --------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values)


def render(
    ctx: Context,
    samples: list[Sample],
    workloads: list[Workload],
    servers: list[str],
    reps: int,
    elapsed: float,
) -> str:
    lines = [
        "# farm vs aiosmtpd: smtp-source benchmark",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} · {harness.versions()}",
        "",
        f"`smtp-source -s {ctx.sessions} -l {ctx.size}` against 127.0.0.1; one server process "
        f"(one event loop) per run, do-nothing handler; {reps} run(s) per cell, servers "
        "interleaved. msgs/s: the best run (outside load only ever slows a run down). "
        "CPU µs/msg: server process user+sys time during the measured run, per message; "
        "median (min-max in brackets); of which sys: the kernel's share. "
        f"Ratio = CPU µs/msg ÷ {BASELINE}'s in the same workload."
        + (
            " farm-Nw: the real `farm serve -w N` (supervisor + N forked workers, uvloop unless "
            "-asyncio) as in production: INFO log to a file, per-client limits applying to the "
            "benchmark's client, the allocator as the farm leaves it; labelled rows take one of "
            "those away. Its CPU is the supervisor's plus all its children's, so server CPU % can "
            "exceed 100 %; smtp-source shares the same cores."
            if any(kind in FARM_SERVERS for kind in servers)
            else ""
        ),
        "",
        "| Workload | Server | msgs/s | x smtp-sink msgs/s | CPU µs/msg | of which sys "
        "| x aiosmtpd-asyncio CPU | server CPU % | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    costs: list[str] = []
    for workload in workloads:
        cell = {
            kind: [s for s in samples if s.workload == workload.key and s.server == kind]
            for kind in servers
        }
        base_cpu = _median([s.cpu_us_per_msg for s in cell.get(BASELINE, [])] or [0.0]) or None
        sink_rate = max((s.msgs_per_s for s in cell.get(SINK, [])), default=0.0) or None
        for kind in servers:
            mine = cell[kind]
            if not mine:
                continue
            rate = max(s.msgs_per_s for s in mine)
            cpus = [s.cpu_us_per_msg for s in mine]
            cpu = _median(cpus)
            sys_us = _median([s.server_sys_s * 1e6 / s.messages for s in mine])
            util = _median([s.server_cpu_s / s.wall_s * 100 for s in mine])
            spread = f" ({min(cpus):.0f}-{max(cpus):.0f})" if len(cpus) > 1 else ""
            ratio = f"{cpu / base_cpu:.3f}x" if base_cpu else "-"
            rate_ratio = f"{rate / sink_rate:.2f}x" if sink_rate else "-"
            goals = []
            if kind in TARGETS and base_cpu and workload.key == "per-conn":
                goal = TARGETS[kind]
                goals.append(f"CPU <= {goal}x " + ("✅" if cpu / base_cpu <= goal else "❌"))
            if kind in RATE_TARGETS and sink_rate:
                goal = RATE_TARGETS[kind]
                goals.append(f"msgs/s >= {goal}x " + ("✅" if rate / sink_rate >= goal else "❌"))
            title = f"{workload.title}, {workload.messages} msgs"
            name = f"{kind} ({LABELS[kind]})" if kind in LABELS else kind
            lines.append(
                f"| {title} | {name} | {rate:,.0f} | {rate_ratio} | {cpu:.0f}{spread} "
                f"| {sys_us:.0f} | {ratio} | {util:.0f}% | {'; '.join(goals)} |"
            )
        for kind, without, what in COSTS:
            if cell.get(kind) and cell.get(without):
                share = _median([s.cpu_us_per_msg for s in cell[kind]]) / _median(
                    [s.cpu_us_per_msg for s in cell[without]]
                )
                verdict = "✅" if share <= COST_TARGET else "❌"
                costs.append(
                    f"{workload.key}: {what} {share:.2f}x ({kind} ÷ {without}, "
                    f"target <= {COST_TARGET}x {verdict})"
                )
    other = [s.other_cpu_s / s.wall_s * 100 for s in samples]
    busiest = max(samples, key=lambda s: s.other_cpu_s / s.wall_s)
    lines += [
        "",
        *(
            ["What each costs, CPU µs/msg with it ÷ without: " + "; ".join(costs) + "."]
            if costs
            else []
        ),
        f"Other processes' CPU during the measured runs: median {_median(other):.0f}% of a core, "
        f"at most {max(other):.0f}% ({busiest.server}, {busiest.workload}, "
        f"run {busiest.rep + 1})"
        + (
            " - the machine was not quiet, throughput figures are suspect."
            if max(other) > NOISY * 100
            else "."
        ),
        "glibc malloc state (`server.py --malloc`, see its docstring): "
        + ", ".join(sorted(ctx.malloc_states))
        + ".",
        "Handlers: " + "; ".join(f"{k}: {v}" for k, v in sorted(ctx.handlers.items())) + ".",
        *_split_lines(samples, workloads, servers),
        f"Total benchmark time {elapsed:.0f}s.",
        "",
    ]
    return "\n".join(lines)


def _split_lines(samples: list[Sample], workloads: list[Workload], servers: list[str]) -> list[str]:
    """For farm serve: how the CPU time divided between the supervisor and the workers."""
    cells = []
    for workload in workloads:
        for kind in servers:
            mine = [
                s
                for s in samples
                if s.workload == workload.key and s.server == kind and s.split_cpu_s
            ]
            if mine:
                cells.append(harness.split_cell(f"{kind} {workload.key}", mine))
    if not cells:
        return []
    return [
        "farm serve CPU split, supervisor / each worker (busiest first), medians: "
        + "; ".join(cells)
        + "."
    ]


# -- profiling -----------------------------------------------------------------------------


def profile(ctx: Context, kind: str, workloads: list[Workload], workdir: Path, top: int) -> None:
    """Run each workload once against a cProfile'd server and print its hottest functions."""
    for workload in workloads:
        stats_path = RESULTS / f"profile-{kind}-{workload.key}.pstats"
        with Server(kind, workdir, ctx.malloc, profile=stats_path) as server:
            proc = smtp_source(ctx, server.port, workload, workload.messages, count=False)
            check_run(server, workload, workload.messages, proc, counted=False)
        if not stats_path.exists():
            raise BenchError(f"{kind} wrote no profile:\n{server.stderr()}")
        print(f"\n## {kind}, {workload.title}, {workload.messages} msgs (cProfile, tottime)\n")
        stats = pstats.Stats(str(stats_path))
        stats.strip_dirs().sort_stats("tottime").print_stats(top)
        print(
            f"(full stats: {stats_path.relative_to(ROOT)}; "
            f"`python -m pstats {stats_path.relative_to(ROOT)}`)"
        )


def report_sample(sample: Sample, reps: int, note: str = "") -> None:
    print(
        f"rep {sample.rep + 1}/{reps} {sample.workload:8} {sample.server:17} "
        f"{sample.msgs_per_s:8,.0f} msgs/s {sample.cpu_us_per_msg:6.0f} µs/msg "
        f"(server {sample.server_cpu_s:5.2f}s cpu, client {sample.client_cpu_s:5.2f}s cpu, "
        f"wall {sample.wall_s:5.2f}s, others {sample.other_cpu_s:5.2f}s cpu)"
        + (
            f" [supervisor {sample.split_cpu_s[0]:.2f}s + workers "
            + "/".join(f"{w:.2f}" for w in sample.split_cpu_s[1:])
            + "s]"
            if sample.split_cpu_s
            else ""
        )
        + f" {note}".rstrip(),
        file=sys.stderr,
        flush=True,
    )


# -- main ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="runs per cell (median reported)")
    parser.add_argument(
        "--servers",
        default=None,
        help=f"comma-separated, from {','.join(ALL_SERVERS)} (default: {','.join(SERVERS)})",
    )
    parser.add_argument(
        "--farm",
        action="store_true",
        help=f"the real farm serve with 1 and 2 workers: --servers {','.join(FARM_SET)}",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(w.key for w in WORKLOADS),
        help="comma-separated subset of " + ",".join(w.key for w in WORKLOADS),
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every message count (e.g. 0.25 for a quick look)",
    )
    parser.add_argument("--quick", action="store_true", help="same as --reps 1 --scale 0.25")
    parser.add_argument("--sessions", type=int, default=SESSIONS)
    parser.add_argument("--size", type=int, default=MSG_SIZE, help="message body octets")
    parser.add_argument(
        "--profile",
        metavar="KIND",
        help="instead of the table, cProfile server KIND under each workload",
    )
    parser.add_argument("--top", type=int, default=25, help="functions shown with --profile")
    parser.add_argument(
        "--retry-budget",
        type=float,
        default=120,
        help="re-run a sample disturbed by other processes only during the first S seconds",
    )
    parser.add_argument(
        "--malloc",
        choices=("warm", "cold", "asis"),
        default="warm",
        help="glibc mmap-threshold state of the servers (see server.py): warm = steady state",
    )
    parser.add_argument(
        "--engine",
        action="store_true",
        help=f"the engine alone, one process per server: --servers {','.join(ENGINE_SET)}",
    )
    parser.add_argument("--no-save", action="store_true", help="don't write results/latest.*")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.scale = 1, 0.25

    if (args.farm or args.engine) and args.servers is not None:
        parser.error("--farm and --engine are shorthands for --servers; give one or the other")
    chosen = args.servers or ",".join(SERVERS)
    if args.farm:
        chosen = ",".join(FARM_SET)
    elif args.engine:
        chosen = ",".join(ENGINE_SET)
    servers = [s for s in chosen.split(",") if s]
    unknown = set(servers) - set(ALL_SERVERS)
    if unknown:
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    keys = [k for k in args.workloads.split(",") if k]
    workloads = []
    for w in WORKLOADS:
        if w.key in keys:
            n = max(args.sessions, round(w.messages * args.scale / args.sessions) * args.sessions)
            workloads.append(replace(w, messages=n))
    if not workloads:
        parser.error("no workload selected")

    ctx = Context(find_smtp_source(), args.sessions, args.size, args.malloc)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        workdir = Path(tmp)
        try:
            if args.profile:
                if args.profile not in ENGINE_SET or args.profile.startswith("aiosmtpd"):
                    parser.error("--profile needs farm-asyncio or farm-uvloop (see --profile-farm)")
                profile(ctx, args.profile, workloads, workdir, args.top)
                return 0
            samples: list[Sample] = []
            for rep in range(args.reps):
                # Rotate the server order each repetition so no server always runs first.
                order = servers[rep % len(servers) :] + servers[: rep % len(servers)]
                for workload in workloads:
                    for kind in order:
                        sample = harness.quietest(
                            lambda: measure(ctx, kind, workload, rep, workdir),  # noqa: B023
                            lambda s, note: report_sample(s, args.reps, note),
                            started,
                            args.retry_budget,
                        )
                        samples.append(sample)
        except BenchError as error:
            print(f"benchmark failed: {error}", file=sys.stderr)
            return 1
    table = render(ctx, samples, workloads, servers, args.reps, time.monotonic() - started)
    print(table)
    if not args.no_save:
        meta = {
            "sessions": ctx.sessions,
            "size": ctx.size,
            "handlers": ctx.handlers,
            "malloc": sorted(ctx.malloc_states),
        }
        save_results("latest", table, meta, workloads, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
