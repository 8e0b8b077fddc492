"""What content scanning costs per message: farm's added CPU and the end-to-end latency.

Usage: ``.venv/bin/python benchmarks/scan.py [--messages N] [--reps N] [--size BYTES]``

Starts one real rspamd (tests/support/rspamd.py's minimal configuration: a normal worker and
a milter-mode proxy) and, for each mode and repetition, a fresh ``farm serve -w 1`` with the
``Sink`` handler (so the handler costs nothing) and:

* ``none``: no ``[scan]``;
* ``rspamd-http``: ``[scan] rspamd`` (HTTP /checkv2);
* ``rspamd-milter``: ``[scan] milters`` = rspamd's proxy.

Load: ``smtp-source -s 1 -m N -l SIZE`` (one message per connection, one at a time), so the
wall time per message is the end-to-end latency a client sees (connect to the reply to QUIT).
CPU is the farm's (supervisor + worker, user + system) and rspamd's (all its processes) over
the run, per message. Reported: the medians over the repetitions, and farm's added CPU per
message against ``none``. Figures on a shared machine vary with its load: say so with them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import find_smtp_source, free_port, greets, process_cpu  # noqa: E402  (benchmarks/)

from tests.support.rspamd import Rspamd  # noqa: E402  (the tests' minimal rspamd)

MODES = ("none", "rspamd-http", "rspamd-milter")


def start_farm(mode: str, rspamd: Rspamd, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    lines = ['handler = "farm.handlers:Sink"', "uvloop = true", "", "[scan]"]
    if mode == "rspamd-http":
        lines.append(f'rspamd = "{rspamd.url}"')
    elif mode == "rspamd-milter":
        lines.append(f'milters = ["{rspamd.milter}"]')
    config = workdir / f"{mode}.toml"
    config.write_text("\n".join(lines) + "\n")
    argv = [sys.executable, "-m", "farm", "serve", "-c", str(config), "-b", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [*argv, "-w", "1", "--log-level", "WARNING"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / f"{mode}.stderr", "ab"),  # noqa: SIM115 - the child keeps it
    )
    deadline = time.monotonic() + 60
    while not greets(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"farm ({mode}) did not start: {(workdir / f'{mode}.stderr').read_text()}"
            )
        time.sleep(0.05)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def run_once(
    mode: str, rspamd: Rspamd, workdir: Path, messages: int, size: int
) -> dict[str, float]:
    smtp_source = find_smtp_source()
    proc, port = start_farm(mode, rspamd, workdir)
    try:
        command = [smtp_source, "-s", "1", "-l", str(size), "-f", "a@bench.test"]
        command += ["-t", "b@bench.test", f"127.0.0.1:{port}"]
        subprocess.run([*command[:1], "-m", "20", *command[1:]], check=True, capture_output=True)
        farm0, rspamd0 = process_cpu(proc.pid, True), process_cpu(rspamd.process.pid, True)
        started = time.perf_counter()
        done = subprocess.run(
            [*command[:1], "-m", str(messages), *command[1:]], capture_output=True, text=True
        )
        wall = time.perf_counter() - started
        farm1, rspamd1 = process_cpu(proc.pid, True), process_cpu(rspamd.process.pid, True)
        if done.returncode != 0 or done.stderr:
            raise RuntimeError(f"smtp-source failed: {done.stderr}")
    finally:
        stop(proc)
    return {
        "latency_ms": wall / messages * 1000,
        "farm_cpu_us": (farm1 - farm0) / messages * 1e6,
        "rspamd_cpu_us": (rspamd1 - rspamd0) / messages * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="farm-scan-bench-"))
    rspamd = Rspamd()
    samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    try:
        for rep in range(args.reps):
            order = MODES[rep % len(MODES) :] + MODES[: rep % len(MODES)]
            for mode in order:
                sample = run_once(mode, rspamd, workdir, args.messages, args.size)
                samples[mode].append(sample)
                print(f"rep {rep + 1} {mode}: {sample}", file=sys.stderr)
    finally:
        rspamd.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)

    def median(mode: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[mode])

    base = median("none", "farm_cpu_us")
    print(f"\nsmtp-source -s 1 -m {args.messages} -l {args.size}; medians of {args.reps} reps")
    print("| mode | latency/msg | farm CPU/msg | added farm CPU/msg | rspamd CPU/msg |")
    print("|---|---:|---:|---:|---:|")
    for mode in MODES:
        farm_cpu = median(mode, "farm_cpu_us")
        print(
            f"| {mode} | {median(mode, 'latency_ms'):.2f} ms | {farm_cpu:.0f} µs"
            f" | {farm_cpu - base:+.0f} µs | {median(mode, 'rspamd_cpu_us'):.0f} µs |"
        )
    print(f"\nload average: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
