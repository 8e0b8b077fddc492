"""Idle or slow clients of the metrics listener cannot starve /ready or /metrics (issue 12, item 7).

A real `farm serve` and real sockets: before the fix, 32 connections that sent nothing (or half a
request) took every client slot of the supervisor's HTTP server, and a health check waited in the
listen queue until the 10 s per-client timeout freed one, so HAProxy took the farm out of rotation.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from farm.supervisor.metrics_http import CLIENT_TIMEOUT, MAX_CLIENTS
from tests.support.farms import Farm, FarmRunner

#: Well under CLIENT_TIMEOUT: a starved request would take that long.
ANSWER_WITHIN = 4.0


def _get(farm: Farm, path: str) -> tuple[int, bytes, float]:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://{farm.metrics_addr}{path}", timeout=ANSWER_WITHIN) as r:
        return r.status, r.read(), time.monotonic() - started


@pytest.fixture
def farm(farms: FarmRunner) -> Farm:
    farm = farms.start("--handler", "farm.handlers:Sink", workers=1)
    farm.wait_ready(1)
    return farm


@pytest.fixture
def hoard() -> Iterator[list[socket.socket]]:
    """Sockets a test opens to the metrics port; all closed at teardown."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def _connect(farm: Farm, count: int, send: bytes, hoard: list[socket.socket]) -> None:
    host, _, port = farm.metrics_addr.rpartition(":")  # type: ignore[union-attr]
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=10)
        if send:
            sock.sendall(send)
        hoard.append(sock)


@pytest.mark.parametrize(
    "send", [b"", b"GET /ready HTTP/1.1\r\nHost: x\r\n"], ids=["idle", "half-request"]
)
def test_held_connections_do_not_starve_ready_and_metrics(
    farm: Farm, hoard: list[socket.socket], send: bytes
) -> None:
    assert ANSWER_WITHIN < CLIENT_TIMEOUT
    _connect(farm, MAX_CLIENTS + 8, send, hoard)
    status, body, took = _get(farm, "/ready")
    assert (status, body) == (200, b"ready\n"), took
    status, body, _ = _get(farm, "/metrics")
    assert status == 200 and b"farm_workers_ready 1.0" in body
    # Room was made by closing the connections held the longest: they see EOF.
    closed = 0
    for sock in hoard:
        sock.settimeout(0.0)
        try:
            closed += sock.recv(1) == b""
        except BlockingIOError:
            pass
        except ConnectionResetError:
            closed += 1
    assert closed >= 8


def test_a_steady_stream_of_idle_connections_does_not_starve_ready(
    farm: Farm, hoard: list[socket.socket]
) -> None:
    for _ in range(3):
        _connect(farm, MAX_CLIENTS, b"", hoard)
        status, body, _ = _get(farm, "/ready")
        assert (status, body) == (200, b"ready\n")
