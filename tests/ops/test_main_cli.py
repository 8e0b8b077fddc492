"""``python -m farm.main``: aiosmtpd's command line, run as a real process."""

from __future__ import annotations

import selectors
import signal
import smtplib
import subprocess
import sys
import time

from tests.support.farms import farm_env
from tests.support.net import free_port


def wait_for_line(proc: subprocess.Popen[str], text: str, timeout: float = 30.0) -> list[str]:
    """Read the process's stderr until a line contains ``text``; the lines read so far."""
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stderr, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(deadline - time.monotonic()):
                break
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if text in line:
                return lines
    raise AssertionError(f"no {text!r} from farm.main within {timeout}s: {lines}")


def test_serves_a_message_and_stops_on_sigint() -> None:
    port = free_port()
    command = ["-m", "farm.main", "-n", "-d", "-l", f"127.0.0.1:{port}", "-c", "farm.handlers.Sink"]
    proc = subprocess.Popen(
        [sys.executable, *command, "-s", "4096"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=farm_env(),
    )
    try:
        wait_for_line(proc, f"Server is listening on 127.0.0.1:{port}")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            code, features = client.ehlo("me")
            assert code == 250 and b"SIZE 4096" in features.splitlines()
            client.sendmail("a@example.com", ["b@example.com"], b"Subject: hi\r\n\r\nhello\r\n")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")


def test_bad_listen_port_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "farm.main", "-n", "-l", "127.0.0.1:smtp"],
        capture_output=True,
        text=True,
        env=farm_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert "Invalid port number: smtp" in result.stderr
    assert "Traceback" not in result.stderr
