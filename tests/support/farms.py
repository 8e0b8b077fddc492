"""Helpers for the supervisor tests: real `farm serve` processes, their logs, metrics and ports.

Every process started here is recorded by a :class:`FarmRunner`, whose ``cleanup()`` (a fixture's
teardown) stops the supervisor (SIGINT, then SIGKILL) and SIGKILLs every farm worker it ever had
that is still there, by pid. Nothing waits with a fixed sleep: every wait polls a condition
until a generous deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.support.client import smtp_greeting
from tests.support.wait import WAIT, wait_for

REPO = Path(__file__).resolve().parents[2]
SMTP_SOURCE = "/usr/sbin/smtp-source"
#: Seconds a farm gets to stop by itself at teardown before it is SIGKILLed.
STOP_GRACE = 10.0

_BANNER = re.compile(r"farm: supervisor pid (\d+): SMTP on (\S+?)[,\s]")
_METRICS_AT = re.compile(r"metrics on http://(\S+)/metrics")
_WORKER_EVENT = re.compile(r"worker (\d+) gen (\d+) (started|ready) \(pid (\d+)\)")
_TITLE = re.compile(r"farm: worker (\d+) gen (\d+)")
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def farm_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a farm process: this one, with the repo importable, no systemd vars."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def toml_config(path: Path, top: Mapping[str, Any], **tables: Mapping[str, Any]) -> Path:
    """Write a small TOML file: top-level keys, then ``[table]`` sections."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return repr(item)
        if isinstance(item, str):
            return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return "[" + ", ".join(value(i) for i in item) + "]"

    lines = [f"{key} = {value(item)}" for key, item in top.items()]
    for name, table in tables.items():
        lines += ["", f"[{name}]", *(f"{key} = {value(item)}" for key, item in table.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text exposition -> {(sample name, labels): value}."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        labels = frozenset(_LABEL.findall(match[2] or ""))
        samples[(match[1], labels)] = float(match[3])
    return samples


def living(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def worker_title(pid: int) -> tuple[int, int] | None:
    """(slot, generation) from a worker's process title, or None if it is not a farm worker."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        match = _TITLE.search(" ".join(proc.cmdline()))
    except psutil.Error:
        return None
    return (int(match[1]), int(match[2])) if match else None


@dataclass
class Farm:
    """One running `farm serve` (or `systemd-socket-activate ... farm serve`) process."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    stdout_path: Path
    stderr_path: Path
    workdir: Path
    port: int = 0
    metrics_addr: str | None = None
    seen_workers: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- logs ------------------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_size(self) -> int:
        """A mark: pass it as ``since`` to look only at what was logged after now."""
        return len(self.log())

    def wait_log(self, pattern: str, since: int = 0, timeout: float = WAIT) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the log after offset ``since``."""
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            self.check_alive()
            return regex.search(self.log(), since)

        return wait_for(found, timeout=timeout, what=f"log line {pattern!r}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the farm exited with {self.proc.returncode}\n--- log:\n{self.log()[-4000:]}"
                f"\n--- stderr:\n{self.stderr()[-4000:]}"
            )

    # -- metrics ---------------------------------------------------------------------------

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        assert self.metrics_addr, "this farm has no --metrics"
        url = f"http://{self.metrics_addr}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return parse_metrics(response.read().decode())

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get((name, frozenset(labels.items())))

    def metric_total(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples carrying ``labels`` (and any others: over the workers)."""
        wanted = labels.items()
        return sum(
            value
            for (sample, sample_labels), value in self.metrics().items()
            if sample == name and wanted <= sample_labels
        )

    def wait_metric(self, name: str, value: float, timeout: float = WAIT, **labels: str) -> None:
        def equal() -> bool:
            self.check_alive()
            return self.metric(name, **labels) == value

        wait_for(equal, timeout=timeout, what=f"{name}{labels or ''} == {value}")

    # -- workers ---------------------------------------------------------------------------

    def workers(self) -> dict[int, tuple[int, int]]:
        """Live worker children: {pid: (slot, generation)} from their process titles."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return {}
        found = {}
        for child in children:
            title = worker_title(child.pid)
            if title is not None:
                found[child.pid] = title
        self.seen_workers.update(found)
        return found

    def slots(self) -> dict[int, int]:
        """{slot: pid} of the live workers (of the newest generation in each slot)."""
        by_slot: dict[int, tuple[int, int]] = {}
        for pid, (slot, generation) in self.workers().items():
            if slot not in by_slot or generation > by_slot[slot][1]:
                by_slot[slot] = (pid, generation)
        return {slot: pid for slot, (pid, _) in sorted(by_slot.items())}

    def wait_workers(self, count: int, generation: int | None = None) -> dict[int, int]:
        """Wait until exactly ``count`` workers run (all of ``generation``, if given).

        Returns {slot: pid}.
        """

        def settled() -> dict[int, int] | None:
            self.check_alive()
            workers = self.workers()
            if len(workers) != count:
                return None
            if generation is not None and any(g != generation for _, g in workers.values()):
                return None
            return {slot: pid for pid, (slot, _) in workers.items()} or None

        return wait_for(settled, what=f"{count} worker(s) of generation {generation}")

    def wait_ready(self, workers: int) -> dict[int, int]:
        """Wait until the farm serves with ``workers`` READY workers; {slot: pid}."""
        if self.metrics_addr:
            self.wait_metric("farm_workers_ready", workers)
        else:
            self.wait_log(r"farm ready: \d+ workers")
        slots = self.wait_workers(workers)
        greeting = smtp_greeting(self.port)
        assert greeting.startswith("220 "), greeting
        return slots

    # -- signals and stopping --------------------------------------------------------------

    def signal(self, signum: int) -> None:
        self.check_alive()
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the farm did not exit within {timeout:.0f}s\n--- log:\n{self.log()[-4000:]}"
            ) from None

    def kill_everything(self) -> None:
        """Stop the supervisor and every farm worker it had (found via psutil and the log).

        A fast stop (SIGINT) first, so that the supervisor reaps its workers itself; SIGKILL
        if it is still there after :data:`STOP_GRACE`; then SIGKILL any worker left over.
        """
        pids = set(self.seen_workers)
        with contextlib.suppress(psutil.NoSuchProcess):
            pids.update(child.pid for child in psutil.Process(self.pid).children(recursive=True))
        pids.update(int(m[4]) for m in _WORKER_EVENT.finditer(self.log()))
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGINT)
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in pids:
            if worker_title(pid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class FarmRunner:
    """Starts farms for one test and kills whatever is left of them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.farms: list[Farm] = []
        self._count = 0

    def start(
        self,
        *args: str,
        config: Path | None = None,
        workers: int = 2,
        bind: str | None = "127.0.0.1:0",
        metrics: bool = True,
        log_file: bool = True,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
        wait: bool = True,
        python: str = sys.executable,
    ) -> Farm:
        """Start ``python -m farm serve`` with ``args``; wait for its banner (if ``wait``)."""
        self._count += 1
        name = f"farm{self._count}"
        log_path = self.tmp_path / f"{name}.log"
        command = [*prefix, python, "-m", "farm", "serve"]
        if config is not None:
            command += ["-c", str(config)]
        if bind is not None:
            command += ["-b", bind]
        command += ["-w", str(workers)]
        if metrics:
            command += ["--metrics", "127.0.0.1:0"]
        if log_file:
            command += ["--log-file", str(log_path)]
        command += list(args)
        stdout_path = self.tmp_path / f"{name}.stdout"
        stderr_path = self.tmp_path / f"{name}.stderr"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=self.tmp_path,
                env=farm_env(env),
            )
        farm = Farm(
            proc, log_path if log_file else stderr_path, stdout_path, stderr_path, self.tmp_path
        )
        self.farms.append(farm)
        if wait:
            self.wait_banner(farm, metrics)
        return farm

    def wait_banner(self, farm: Farm, metrics: bool = True) -> None:
        banner = farm.wait_log(_BANNER.pattern)
        assert int(banner[1]) == farm.pid
        farm.port = int(banner[2].rpartition(":")[2])
        if metrics:
            farm.metrics_addr = farm.wait_log(r"farm\.supervisor: " + _METRICS_AT.pattern)[1]

    def cleanup(self) -> None:
        for farm in self.farms:
            farm.kill_everything()


def serve_expecting_exit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``farm serve`` that is expected to stop by itself at start-up."""
    return subprocess.run(
        [sys.executable, "-m", "farm", "serve", "-b", "127.0.0.1:0", "-w", "1", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=farm_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )


def delivered(path: Path) -> list[str]:
    """Lines written by tests.support.handlers.counting (one per accepted message), complete ones
    only."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return text[: text.rfind("\n") + 1].splitlines()


# -- smtp-source ------------------------------------------------------------------------------


def smtp_source_command(port: int, *options: str) -> list[str]:
    return [SMTP_SOURCE, *options, f"127.0.0.1:{port}"]


def run_smtp_source(
    port: int, *options: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        smtp_source_command(port, *options),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def start_smtp_source(
    port: int, *options: str, stdout: Any = subprocess.PIPE
) -> subprocess.Popen[str]:
    """smtp-source in the background (``stdout`` may be a file: ``-c`` output is long)."""
    return subprocess.Popen(
        smtp_source_command(port, *options),
        stdout=stdout,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
