"""`farm serve`: a real process, a real client, a real SIGTERM."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys

from tests.support.net import free_port


def start_farm(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "farm", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_serve_delivers_and_stops_on_sigterm() -> None:
    port = free_port()
    proc = start_farm(
        "--bind", f"127.0.0.1:{port}", "-w", "1", "--handler", "farm.handlers:Debugging"
    )
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()  # printed once listening
        assert f"127.0.0.1:{port}" in banner
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("a@example.com", ["b@example.com"], "Subject: hi\r\n\r\nbody\r\n")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "Subject: hi" in out
    assert "outcome=250" in err
    assert "Traceback" not in err


def test_serve_bad_handler_is_a_clear_error() -> None:
    proc = start_farm("--bind", "127.0.0.1:0", "-w", "2", "--handler", "no.such.module:Handler")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "cannot import handler module 'no.such.module'" in err
    assert "before it was ready (the handler could not be loaded); stopping" in err
    assert "Traceback" not in err


def test_serve_bad_bind_is_a_clear_error() -> None:
    proc = start_farm("--bind", "nonsense")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err == (
        "farm: command line: bind: bad address 'nonsense': "
        "expected HOST:PORT, [IPv6]:PORT, unix:/path or fd://N\n"
    )
