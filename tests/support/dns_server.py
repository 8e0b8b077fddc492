"""A real DNS server for the tests: Debian's unbound on a free loopback port, serving zones the
test writes (``local-data`` records), refusing every other name (no query ever leaves the
host), and optionally forwarding one zone to a "black hole" (a UDP socket that never answers:
a slow authoritative server). Stopped by PID; never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from tests.support.net import free_udp_tcp_port
from tests.support.wait import WAIT, wait_for

UNBOUND = "/usr/sbin/unbound"


def txt(text: str) -> str:
    """A TXT record's data: the text in quoted strings of at most 255 octets."""
    chunks = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    return " ".join('"' + chunk.replace('"', '\\"') + '"' for chunk in chunks)


class BlackHole:
    """A UDP socket on loopback that reads queries and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


class Unbound:
    """One unbound process serving ``records`` in ``zones``.

    ``records`` are unbound ``local-data`` lines (``"name. TTL IN TYPE data"``). Names in
    ``slow_zone`` are forwarded to a black hole: their lookups hang until the client gives up.
    """

    def __init__(
        self,
        directory: Path,
        zones: Iterable[str],
        records: Iterable[str],
        slow_zone: str | None = None,
    ) -> None:
        self.directory = directory
        self.zones = [zone.rstrip(".") + "." for zone in zones]
        self.records = list(records)
        self.slow_zone = slow_zone.rstrip(".") + "." if slow_zone else None
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.black_hole: BlackHole | None = None
        self.log_path = directory / "unbound.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> str:
        lines = [
            "server:",
            "  interface: 127.0.0.1",
            f"  port: {self.port}",
            "  do-ip6: no",
            "  do-daemonize: no",
            '  chroot: ""',
            '  username: ""',
            f'  directory: "{self.directory}"',
            '  pidfile: ""',
            "  use-syslog: no",
            "  verbosity: 1",
            "  num-threads: 1",
            "  so-reuseport: no",
            "  access-control: 127.0.0.0/8 allow",
            '  module-config: "iterator"',
            "  do-not-query-localhost: no",
            # Answers with a 1 s TTL expire; nothing is served stale.
            "  serve-expired: no",
            "  cache-min-ttl: 0",
            '  local-zone: "." refuse',
        ]
        for zone in self.zones:
            lines.append(f'  local-zone: "{zone}" static')
        for record in self.records:
            lines.append(f"  local-data: '{record}'")
        if self.slow_zone:
            lines.append(f'  local-zone: "{self.slow_zone}" transparent')
        lines += ["remote-control:", "  control-enable: no"]
        if self.slow_zone:
            assert self.black_hole is not None
            lines += [
                "forward-zone:",
                f'  name: "{self.slow_zone}"',
                f"  forward-addr: 127.0.0.1@{self.black_hole.port}",
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> Unbound:
        if self.slow_zone and self.black_hole is None:
            self.black_hole = BlackHole()
        self.port = free_udp_tcp_port()
        config = self.directory / "unbound.conf"
        config.write_text(self._config())
        check = subprocess.run(
            [UNBOUND + "-checkconf", str(config)], capture_output=True, text=True, timeout=WAIT
        )
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [UNBOUND, "-d", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_serving()
        return self

    def _wait_serving(self) -> None:
        assert self.process is not None
        query = dns.message.make_query(self.zones[0], "SOA")

        def answering() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"unbound exited: {self.log_path.read_text()}")
            with contextlib.suppress(Exception):
                answer = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.5)
                return answer.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
            return False

        try:
            wait_for(answering, "unbound answering", timeout=WAIT)
        except AssertionError as error:
            raise AssertionError(f"{error}: {self.log_path.read_text()}") from None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self) -> None:
        """Stop the server by its PID (TERM, then KILL), and close the black hole."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=WAIT)
        if self.black_hole is not None:
            self.black_hole.close()
            self.black_hole = None


@contextlib.contextmanager
def unbound(
    directory: Path, zones: Iterable[str], records: Iterable[str], slow_zone: str | None = None
) -> Iterator[Unbound]:
    server = Unbound(directory, zones, records, slow_zone).start()
    try:
        yield server
    finally:
        server.stop()


# -- pytest fixtures (a plugin: tests/conftest.py lists this module) ------------------------------


def _require_unbound() -> None:
    if not Path(UNBOUND).exists():
        if os.environ.get("CI"):
            raise AssertionError("unbound is missing: .ci/run installs the Debian package unbound")
        pytest.skip("unbound not installed (Debian package unbound)")


@pytest.fixture(scope="module")
def mail_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    """One unbound for a test module, serving tests/support/mail_auth_zones.py (slow.test: a black
    hole)."""
    _require_unbound()
    from tests.support import mail_auth_zones as zones

    directory = tmp_path_factory.mktemp("dns")
    with unbound(directory, zones.ZONES, zones.records(), zones.SLOW_ZONE) as server:
        yield server


@pytest.fixture
def own_dns(tmp_path: Path) -> Iterator[Callable[..., Unbound]]:
    """Factory of unbounds for one test (to stop mid-test): ``own_dns(dnsbl_ttl=300)``."""
    _require_unbound()
    from tests.support import mail_auth_zones as zones

    servers: list[Unbound] = []

    def start(dnsbl_ttl: int = 300) -> Unbound:
        directory = tmp_path / f"dns{len(servers)}"
        directory.mkdir()
        server = Unbound(directory, zones.ZONES, zones.records(dnsbl_ttl), zones.SLOW_ZONE)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
