"""Helpers for the scale-out tests: HAProxy in front of farms, and smtp-sink as a next hop.

Every process is started with a known pid and stopped by that pid (``stop()``); waits poll a
condition until a generous deadline, never a fixed sleep.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.net import free_port
from tests.support.processes import stop_process
from tests.support.wait import WAIT, wait_for

HAPROXY = shutil.which("haproxy", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
SMTP_SINK = "/usr/sbin/smtp-sink"

#: Outside CI a missing haproxy skips these tests; in CI (which installs it) it fails them.
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None and not os.environ.get("CI"),
    reason="haproxy not installed (apt-get install haproxy)",
)
needs_smtp_sink = pytest.mark.skipif(
    not os.path.exists(SMTP_SINK) and not os.environ.get("CI"),
    reason="smtp-sink not installed (apt-get install postfix)",
)


@dataclass(frozen=True)
class Backend:
    """One farm behind HAProxy: its SMTP port and its metrics (``/ready``) port."""

    name: str
    smtp_port: int
    metrics_port: int


def haproxy_config(
    frontend_port: int, backends: Sequence[Backend], stats_socket: Path, *, check_ms: int = 100
) -> str:
    """TCP mode, PROXY v2 to the farms, health check ``GET /ready`` on their metrics ports."""
    servers = "\n".join(
        f"    server {b.name} 127.0.0.1:{b.smtp_port} send-proxy-v2"
        f" check port {b.metrics_port} inter {check_ms}ms fall 1 rise 1"
        for b in backends
    )
    return f"""\
global
    maxconn 2000
    stats socket {stats_socket} level admin
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    # A busy test machine may answer a check late: only a 503 or a refusal should count.
    timeout check 5s
    retries 3
    option redispatch

frontend smtp
    bind 127.0.0.1:{frontend_port}
    default_backend farms

backend farms
    balance roundrobin
    option httpchk GET /ready
{servers}
"""


class HAProxy:
    """``haproxy -db -f <cfg>`` in the foreground on a free loopback port."""

    def __init__(self, workdir: Path, backends: Sequence[Backend]) -> None:
        assert HAPROXY is not None, "haproxy is not installed"
        self.port = free_port()
        self.stats_socket = workdir / "haproxy.sock"
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.backends = list(backends)
        self.config_path.write_text(haproxy_config(self.port, self.backends, self.stats_socket))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.process.returncode}:\n{self.log()}")

    def command(self, line: str) -> str:
        """One command on the admin socket; its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(WAIT)
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def statuses(self) -> dict[str, str]:
        """{server name: status} of the backend's servers (``UP``, ``DOWN``, ``MAINT``...)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row.get("pxname") == "farms" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_statuses(self, wanted: Mapping[str, str], timeout: float = WAIT) -> None:
        def reached() -> bool:
            self.check_alive()
            if not self.stats_socket.exists():
                return False
            try:
                current = self.statuses()
            except OSError:
                return False
            return all(current.get(name, "").startswith(s) for name, s in wanted.items())

        wait_for(reached, timeout=timeout, what=f"haproxy servers {dict(wanted)}")

    def stop(self) -> None:
        stop_process(self.process, grace=10)


def http_get(address: str, path: str) -> tuple[int, str]:
    """(status, body) of ``GET http://address/path``; 503 and other errors included."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=WAIT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
