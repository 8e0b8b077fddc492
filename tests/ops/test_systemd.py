"""sd_notify to a fake NOTIFY_SOCKET, watchdog parsing, the unit files under systemd-analyze."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from farm.supervisor.systemd import Notifier, monotonic_usec
from tests.support.notify import NotifySocket

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
SECURITY_LIMIT = 2.0
"""Highest acceptable ``systemd-analyze security`` exposure (1.1 with systemd 252)."""


@pytest.fixture
def notify_path() -> Iterator[NotifySocket]:
    """A fake systemd notify socket in the file system."""
    with NotifySocket() as notify:
        yield notify


@pytest.fixture
def notify_abstract() -> Iterator[NotifySocket]:
    """A fake notify socket in the abstract namespace (``@name``)."""
    with NotifySocket(abstract=True) as notify:
        yield notify


@pytest.mark.parametrize("which", ["notify_path", "notify_abstract"])
def test_notifications_arrive_in_order(which: str, request: pytest.FixtureRequest) -> None:
    notify = request.getfixturevalue(which)
    notifier = Notifier({"NOTIFY_SOCKET": notify.address})
    assert notifier.enabled
    assert notifier.ready("2 workers ready")
    assert notifier.status("serving 3 sessions")
    before = monotonic_usec()
    assert notifier.reloading("reloading configuration")
    after = monotonic_usec()
    assert notifier.ready()
    assert notifier.watchdog()
    assert notifier.extend_timeout(12.5)
    assert notifier.stopping("draining")

    messages = [notify.recv() for _ in range(7)]
    assert messages[0] == b"READY=1\nSTATUS=2 workers ready"
    assert messages[1] == b"STATUS=serving 3 sessions"
    reload = re.fullmatch(
        rb"RELOADING=1\nMONOTONIC_USEC=(\d+)\nSTATUS=reloading configuration", messages[2]
    )
    assert reload is not None, messages[2]
    assert before <= int(reload[1]) <= after
    assert messages[3:] == [
        b"READY=1",
        b"WATCHDOG=1",
        b"EXTEND_TIMEOUT_USEC=12500000",
        b"STOPPING=1\nSTATUS=draining",
    ]
    assert notify.pending() == []


def test_status_is_one_line(notify_path: NotifySocket) -> None:
    Notifier({"NOTIFY_SOCKET": notify_path.address}).status("one\ntwo\r\nthree")
    assert notify_path.recv() == b"STATUS=one two three"


def test_monotonic_usec_is_clock_monotonic() -> None:
    import time

    ours = monotonic_usec()
    theirs = time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000
    assert abs(theirs - ours) < 1_000_000


def test_reads_os_environ_by_default(
    notify_path: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_path.address)
    assert Notifier().ready()
    assert notify_path.recv() == b"READY=1"


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    for notifier in (Notifier(), Notifier({})):
        assert not notifier.enabled
        assert notifier.ready("x") is False
        assert notifier.reloading() is False
        assert notifier.stopping() is False
        assert notifier.status("x") is False
        assert notifier.watchdog() is False


def test_send_errors_never_raise_and_warn_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.DEBUG, logger="farm.supervisor"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].name == "farm.supervisor"
    assert "cannot notify systemd at" in warnings[0].getMessage()
    assert "No such file or directory" in warnings[0].getMessage()


def test_unsupported_notify_socket(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    with caplog.at_level(logging.WARNING, logger="farm.supervisor"):
        assert notifier.ready() is False
    assert "unsupported NOTIFY_SOCKET='vsock:2:1234'" in caplog.text


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    pids = {"pid": str(os.getpid()), "other": str(os.getpid() + 1)}
    environ = {key: value.format(**pids) for key, value in environ.items()}
    assert Notifier(environ).watchdog_interval == interval


# --- unit files --------------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[str]]:
    """``Key`` -> values (repeated keys accumulate), ignoring sections and comments."""
    keys: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def test_units_say_what_the_supervisor_expects() -> None:
    service = _unit(UNITS / "farm.service")
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["KillMode"] == ["mixed"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert float(service["TimeoutStopSec"][0]) > 30  # above the default graceful_timeout
    assert service["OOMPolicy"] == ["continue"]
    socket_unit = _unit(UNITS / "farm.socket")
    ports = {value.rsplit(":", 1)[-1] for value in socket_unit["ListenStream"]}
    assert ports == {"25", "587"}
    assert socket_unit["Service"] == ["farm.service"]


def _farm_command() -> str:
    script = Path(sys.executable).parent / "farm"
    return str(script) if script.exists() else f"{sys.executable} -m farm"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Both units verify cleanly (ExecStart pointed at this checkout's ``farm``)."""
    service = (UNITS / "farm.service").read_text()
    assert "ExecStart=/usr/local/bin/farm " in service
    service = service.replace("ExecStart=/usr/local/bin/farm ", f"ExecStart={_farm_command()} ")
    (tmp_path / "farm.service").write_text(service)
    shutil.copy(UNITS / "farm.socket", tmp_path / "farm.socket")
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(tmp_path / "farm.service"),
            str(tmp_path / "farm.socket"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    # Unknown keys and unparsable values are only warnings (exit status 0): fail on them too.
    ours = [line for line in output.splitlines() if "farm" in line]
    assert result.returncode == 0, output
    assert ours == [], output


def security_exposure() -> float:
    """The overall exposure level ``systemd-analyze security --offline=yes`` gives farm.service."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNITS / "farm.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for farm\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match[1])


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_security_exposure() -> None:
    exposure = security_exposure()
    print(f"systemd-analyze security farm.service: exposure {exposure}")
    assert exposure <= SECURITY_LIMIT
