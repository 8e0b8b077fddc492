"""What the smtp-source benchmarks share (``run.py``, ``relay.py``, ``breakdown.py``, ...).

The servers they measure (a ``server.py`` process, ``smtp-sink`` or ``farm serve`` with its
workers: started, found ready, CPU read, stopped by PID), the load (``smtp-source``, its run
checked), the CPU accounting around a run, the retry of a noisy sample, and the report's
common parts (versions line, supervisor/worker split, results files).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from server import FARM_KINDS, MESSAGE_LINE  # noqa: E402  (benchmarks/server.py)

ROOT = HERE.parent
SERVER = HERE / "server.py"
RESULTS = HERE / "results"

#: Postfix's smtp-sink (C, does nothing with the mail): the reference for msgs/s.
SINK = "smtp-sink"
#: The real ``farm serve`` (supervisor + N forked workers, see server.py ``FARM_KINDS``):
#: KIND -> number of workers.
FARM_SERVERS = {kind: workers for kind, (workers, _, _) in FARM_KINDS.items()}
#: Other processes using more than this share of a core during a run make it "noisy".
NOISY = 0.2
SESSIONS = 20
MSG_SIZE = 1024


class BenchError(RuntimeError):
    pass


class Rates:
    """What a benchmark's sample dataclass derives from its fields: msgs/s and CPU µs/msg
    (``cpu_s``: the measured server's CPU seconds, given by the sample)."""

    messages: int
    wall_s: float
    other_cpu_s: float
    split_cpu_s: list[float]

    @property
    def cpu_s(self) -> float:
        raise NotImplementedError

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.wall_s

    @property
    def cpu_us_per_msg(self) -> float:
        return self.cpu_s * 1e6 / self.messages


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    flags: tuple[str, ...]
    warmup: int
    #: Messages per measured run, where the workload fixes it (run.py).
    messages: int = 0


WORKLOADS = [
    # Without -d smtp-source opens a connection per message: HELO MAIL RCPT DATA QUIT.
    Workload("per-conn", "1 msg/connection", (), 200),
    # -d: "don't disconnect after sending a message", so each of the sessions sends
    # messages/sessions messages over one connection (HELO, then MAIL RCPT DATA repeated, QUIT).
    Workload("long", "many msgs/connection (-d)", ("-d",), 400),
]


# -- processes -----------------------------------------------------------------------------


def find_postfix_tool(name: str) -> str:
    """The path of Postfix's ``smtp-source`` or ``smtp-sink`` (exits with a hint if absent)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if not found:
        raise SystemExit(f"{name} not found (Debian: apt-get install postfix)")
    return found


def find_smtp_source() -> str:
    return find_postfix_tool("smtp-source")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def greets(port: int, timeout: float = 5.0) -> bool:
    """Whether 127.0.0.1:port answers with a 220 greeting (and then QUIT)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as probe:
            if not probe.makefile("rb").readline().startswith(b"220"):
                return False
            probe.sendall(b"QUIT\r\n")
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 5.0, name: str = "") -> None:
    """SIGTERM ``proc``, SIGKILL it if it is still there after ``grace`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            print(
                f"{name or proc.pid}: still running {grace:.0f}s after SIGTERM, SIGKILL",
                file=sys.stderr,
            )
            proc.kill()
            proc.wait()


def start_sink(out_path: Path | None, err_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``smtp-sink -c 127.0.0.1:PORT 256`` on a free port, answering 220: (process, port).

    ``-u nobody`` as root (it refuses root); its ``-c`` counters go to ``out_path``.
    """
    program = find_postfix_tool("smtp-sink")
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    for _attempt in range(3):  # the port picked may be taken before smtp-sink binds it
        port = free_port()
        cmd = [program, "-c", *user, f"127.0.0.1:{port}", "256"]
        with contextlib.ExitStack() as files:
            out = files.enter_context(out_path.open("wb")) if out_path else subprocess.DEVNULL
            err = files.enter_context(err_path.open("wb"))
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                if greets(port):
                    return proc, port
                time.sleep(0.01)
        except BaseException:
            stop_process(proc)
            raise
        stop_process(proc)
    raise BenchError(f"smtp-sink did not start:\n{err_path.read_text(errors='replace').strip()}")


class Server:
    """One ``server.py`` subprocess (or smtp-sink, or ``farm serve`` started by a subclass
    with :meth:`start_farm`), stopped by PID when the block ends."""

    def __init__(
        self, kind: str, workdir: Path, malloc: str = "warm", profile: Path | None = None
    ) -> None:
        self.kind = kind
        self.malloc = malloc
        self.portfile = workdir / f"{kind}.port"
        self.stderr_path = workdir / f"{kind}.stderr"
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.handler = ""
        self.malloc_state = ""
        #: farm serve: workers expected, the sd_notify socket it reports readiness on, and the
        #: descendants seen (pid -> process), checked at every CPU reading and killed at stop.
        self.workers = FARM_SERVERS.get(kind, 0)
        self.notify: socket.socket | None = None
        self.notify_path = workdir / f"{kind}.notify"
        self.children: dict[int, psutil.Process] = {}
        #: farm serve: user+sys CPU seconds per pid at the last :meth:`cpu_seconds`.
        self.per_process: dict[int, float] = {}

    def __enter__(self) -> Server:
        if self.kind == SINK:
            return self._start_sink()
        self.portfile.unlink(missing_ok=True)
        cmd = [sys.executable, str(SERVER), self.kind, str(self.portfile), "--malloc", self.malloc]
        if self.profile is not None:
            cmd += ["--profile", str(self.profile)]
        # farm's supervisor sends sd_notify READY=1 once every worker has reported READY.
        env = self._notify_env() if self.workers else None
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env
            )
        deadline = time.monotonic() + 30
        while not self.portfile.exists():
            if self.proc.poll() is not None:
                raise BenchError(f"{self.kind} exited at startup:\n{self.stderr()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{self.kind} did not start listening within 30s")
            time.sleep(0.01)
        port, _pid, malloc_state, handler = self.portfile.read_text().strip().split(" ", 3)
        self.port, self.handler, self.malloc_state = int(port), handler, malloc_state
        self.ps = psutil.Process(self.proc.pid)
        if self.workers:
            try:
                self._farm_ready(deadline)
            except BaseException:
                self.stop()
                raise
            self.handler += f" (farm serve -w {self.workers})"
        return self

    def _start_sink(self) -> Server:
        self.proc, self.port = start_sink(None, self.stderr_path)
        self.ps = psutil.Process(self.proc.pid)
        self.handler, self.malloc_state = "smtp-sink (C, discards)", "n/a"
        return self

    def _notify_env(self) -> dict[str, str]:
        """Bind the sd_notify socket farm serve reports READY=1 on; the child's environment."""
        self.notify_path.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.05)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))
        }
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        return env

    def start_farm(self, cmd: list[str], extra_env: dict[str, str] | None = None) -> None:
        """Start ``farm serve`` (``cmd``, from the checkout) and wait until its workers are
        ready; stopped again if that fails."""
        env = self._notify_env() | (extra_env or {})
        try:
            with self.stderr_path.open("wb") as err:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, cwd=ROOT
                )
            self.ps = psutil.Process(self.proc.pid)
            self._farm_ready(time.monotonic() + 30)
        except BaseException:
            self.stop()
            raise

    def log_messages(self) -> int | None:
        """farm serve with a log file: how many message lines it holds (after the stop)."""
        profile = FARM_KINDS.get(self.kind, (0, "", ""))[2]
        if profile not in ("production", "nolimits"):
            return None
        path = self.portfile.parent / f"{self.kind}.log"
        try:
            return len(MESSAGE_LINE.findall(path.read_bytes()))
        except FileNotFoundError:
            return 0

    def _farm_ready(self, deadline: float) -> None:
        """Wait for READY=1, find the supervisor's listening port and check it answers 220."""
        assert self.proc is not None and self.notify is not None
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.kind} exited at startup:\n{self.stderr()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.kind} did not report READY=1 within 30s:\n{self.stderr()}")
            try:
                datagram = self.notify.recv(4096)
            except TimeoutError:
                continue
            if "READY=1" in datagram.decode(errors="replace").splitlines():
                break
        ports = {
            conn.laddr.port
            for conn in self.ps.net_connections(kind="tcp")
            if conn.status == psutil.CONN_LISTEN
        }
        if len(ports) != 1:
            raise BenchError(f"{self.kind}: expected one listening port, found {sorted(ports)}")
        self.port = ports.pop()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as probe:
            greeting = probe.makefile("rb").readline()
            if not greeting.startswith(b"220"):
                raise BenchError(f"{self.kind}: greeting {greeting!r}, not 220")
            probe.sendall(b"QUIT\r\n")
        self.children = {p.pid: p for p in self.ps.children(recursive=True)}
        if len(self.children) < self.workers:
            raise BenchError(
                f"{self.kind}: READY with {len(self.children)} child process(es), "
                f"not {self.workers} workers"
            )

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def cpu_seconds(self) -> tuple[float, float]:
        """(user+sys, sys) CPU seconds the server has used so far.

        For farm serve: the supervisor's plus every descendant's. The workers live through the
        whole run, so the difference of two readings is the farm's CPU time in between; a
        process that came or went (a worker replaced, say) would make it wrong, so that is an
        error.
        """
        if not self.workers:
            times = self.ps.cpu_times()
            return times.user + times.system, times.system
        try:
            children = self.ps.children(recursive=True)
            if {p.pid for p in children} != set(self.children):
                raise BenchError(
                    f"{self.kind}: worker processes changed ({sorted(self.children)} -> "
                    f"{sorted(p.pid for p in children)}):\n{self.stderr()[-2000:]}"
                )
            user = system = 0.0
            for process in [self.ps, *children]:
                times = process.cpu_times()
                user, system = user + times.user, system + times.system
                self.per_process[process.pid] = times.user + times.system
        except psutil.NoSuchProcess as error:
            raise BenchError(
                f"{self.kind}: process {error.pid} vanished:\n{self.stderr()}"
            ) from None
        return user + system, system

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace").strip()
        except FileNotFoundError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None and self.workers:
            # Include workers forked since the last look, before the supervisor goes.
            with contextlib.suppress(psutil.NoSuchProcess):
                self.children.update((p.pid, p) for p in self.ps.children(recursive=True))
            grace = 10.0  # a graceful farm stop: workers drain, then the supervisor exits
        stop_process(proc, grace, self.kind)
        if self.children:
            # No worker may outlive its supervisor (it would keep a core busy, or the port).
            _gone, alive = psutil.wait_procs(list(self.children.values()), timeout=5)
            for process in alive:
                print(f"{self.kind}: worker {process.pid} survived, SIGKILL", file=sys.stderr)
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            psutil.wait_procs(alive, timeout=5)
            self.children = {}
        if self.notify is not None:
            self.notify.close()
            self.notify = None
            self.notify_path.unlink(missing_ok=True)


# -- load ----------------------------------------------------------------------------------


def smtp_source(
    program: str,
    port: int,
    workload: Workload,
    messages: int,
    *,
    count: bool,
    sender: str,
    recipient: str,
    sessions: int = SESSIONS,
    size: int = MSG_SIZE,
) -> subprocess.CompletedProcess[str]:
    """One ``smtp-source -s SESSIONS -l SIZE -m MESSAGES`` run at 127.0.0.1:port (``-c``: its
    counter on stdout), output captured."""
    cmd = [program, "-s", str(sessions), "-l", str(size), "-m", str(messages)]
    cmd += [*workload.flags, "-f", sender, "-t", recipient, "-M", "client.test"]
    if count:
        cmd.append("-c")
    cmd.append(f"127.0.0.1:{port}")
    timeout = 30 + messages / 50  # generous: even 50 msgs/s finishes
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:  # run() has killed it
        raise BenchError(f"smtp-source still running after {timeout:.0f}s") from None


def source_problem(proc: subprocess.CompletedProcess[str], messages: int, counted: bool) -> str:
    """What went wrong in an smtp-source run ("" if nothing): it stops with a fatal error on any
    unexpected reply or failed connect, and with ``-c`` its counter must end at ``messages``."""
    if proc.returncode != 0:
        return f"exit status {proc.returncode}"
    if proc.stderr.strip():
        return "output on stderr"
    if counted:
        # -c prints "\r<n>" after each completed DATA; the last one must be the total.
        numbers = re.findall(r"\d+", proc.stdout)
        if not numbers or int(numbers[-1]) != messages:
            return f"counter ended at {numbers[-1] if numbers else 'nothing'}, not {messages}"
    elif proc.stdout.strip():
        return "unexpected output on stdout"
    return ""


# -- CPU accounting ------------------------------------------------------------------------


def children_cpu() -> float:
    """User+sys CPU seconds of this process's waited-for children (smtp-source runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def busy_cpu() -> float:
    """CPU seconds the whole machine has spent not idle, all cores summed."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def process_cpu(pid: int, tree: bool = False) -> float:
    """User+sys CPU seconds of ``pid`` so far (``tree``: plus its live descendants'); 0 if
    it is gone."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for proc in [root, *(root.children(recursive=True) if tree else [])]:
            times = proc.cpu_times()
            total += times.user + times.system
        return total
    except psutil.NoSuchProcess:
        return 0.0


S = TypeVar("S", bound=Rates)


def quietest(
    measure: Callable[[], S], report: Callable[[S, str], None], started: float, budget: float
) -> S:
    """A sample from ``measure``; if other processes competed for the CPUs meanwhile, measure
    again, once, while the time budget (seconds since ``started``) allows, and keep the
    quieter of the two runs."""
    sample = measure()
    report(sample, "")
    if sample.other_cpu_s > NOISY * sample.wall_s and time.monotonic() - started < budget:
        again = measure()
        report(again, "(retry: the first run was noisy)")
        sample = min(sample, again, key=lambda s: s.other_cpu_s / s.wall_s)
    return sample


# -- report --------------------------------------------------------------------------------


def versions() -> str:
    """Python, aiosmtpd, uvloop and farm versions and the CPU, for a table's heading."""
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "n/a"

    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"Python {platform.python_version()}, aiosmtpd {version('aiosmtpd')}, "
        f"uvloop {version('uvloop')}, farm {rev or 'no commit yet'}; "
        f"{os.cpu_count()} CPUs ({cpu or platform.machine()})"
    )


def split_cell(label: str, samples: Sequence[Rates]) -> str:
    """``LABEL S% / W1% / W2%``: the median shares of the supervisor and each worker (busiest
    first) in the samples' farm CPU seconds."""
    shares = [
        statistics.median(s.split_cpu_s[i] / s.cpu_s * 100 for s in samples if s.cpu_s)
        for i in range(min(len(s.split_cpu_s) for s in samples))
    ]
    return f"{label} {shares[0]:.0f}% / " + " / ".join(f"{share:.0f}%" for share in shares[1:])


def save_results(
    name: str, table: str, meta: dict[str, Any], workloads: Iterable[Any], samples: Iterable[Any]
) -> None:
    """Write ``results/NAME.md`` (the table) and ``results/NAME.json`` (every sample)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(table)
    raw = {
        **meta,
        "workloads": [asdict(w) for w in workloads],
        "samples": [
            {**asdict(s), "msgs_per_s": s.msgs_per_s, "cpu_us_per_msg": s.cpu_us_per_msg}
            for s in samples
        ],
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(raw, indent=2) + "\n")
    print(f"(written to {(RESULTS / f'{name}.md').relative_to(ROOT)})", file=sys.stderr)
