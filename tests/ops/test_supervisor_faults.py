"""More supervisor faults: the supervisor itself dies, a slot crash-loops, fast stop, max_rss."""

from __future__ import annotations

import os
import signal
import smtplib
from pathlib import Path

import psutil
import pytest

from tests.support.client import send_message
from tests.support.farms import FarmRunner, living, toml_config
from tests.support.wait import wait_for


def crash_a_worker(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("me")
        client.mail("a@farm.test")
        client.rcpt("crash@farm.test")
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(b"x\r\n.\r\n")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.getreply()  # no 250: the worker died with the message


def test_workers_exit_when_the_supervisor_is_killed(farms: FarmRunner) -> None:
    farm = farms.start("--handler", "farm.handlers:Sink", workers=2)
    workers = list(farm.wait_ready(2).values())
    os.kill(farm.pid, signal.SIGKILL)
    farm.wait_exit(30)
    # EOF on their channel tells them: they drain and exit, nothing keeps the port.
    wait_for(lambda: not any(living(pid) for pid in workers), what="orphaned workers to exit")


def test_a_slot_that_keeps_dying_young_is_respawned_with_growing_backoff(
    farms: FarmRunner, tmp_path: Path
) -> None:
    config = toml_config(
        tmp_path / "farm.toml", {"handler": "tests.support.handlers.crashing:Crashing"}
    )
    farm = farms.start(config=config, workers=1)
    farm.wait_ready(1)
    crash_a_worker(farm.port)
    farm.wait_log(r"worker 0 gen 1 \(pid \d+\) exited with status 70 \(crash\); respawning in 1s")
    wait_for(lambda: farm.metric("farm_workers_ready") == 1, what="slot 0 refilled")
    crash_a_worker(farm.port)  # again, within seconds of READY: dying young
    farm.wait_log(r"exited with status 70 \(crash\); respawning in 2s")
    wait_for(lambda: farm.metric("farm_workers_ready") == 1, what="slot 0 refilled again")
    assert farm.metric("farm_worker_restarts_total", reason="crash") == 2
    assert send_message(farm.port, "fine@farm.test").startswith("250")


def test_int_is_a_fast_stop(farms: FarmRunner, tmp_path: Path) -> None:
    config = toml_config(
        tmp_path / "farm.toml", {"handler": "farm.handlers:Sink", "graceful_timeout": 60}
    )
    farm = farms.start(config=config, workers=2)
    workers = list(farm.wait_ready(2).values())
    with smtplib.SMTP("127.0.0.1", farm.port, timeout=10) as idle:
        idle.ehlo("me")
        farm.signal(signal.SIGINT)
        assert farm.wait_exit(15) == 0  # not the 60 s graceful timeout
    assert not any(living(pid) for pid in workers)


def test_max_rss_recycles_the_worker(farms: FarmRunner, tmp_path: Path) -> None:
    config = toml_config(tmp_path / "farm.toml", {"handler": "farm.handlers:Sink", "max_rss": 1})
    farm = farms.start(config=config, workers=1)
    first = farm.wait_ready(1)[0]
    assert psutil.Process(first).memory_info().rss > 1024 * 1024
    farm.wait_log(rf"worker 0 \(pid {first}\) asks to be recycled: max_rss: \d+ MiB")
    farm.wait_log(rf"worker 0 gen 1 \(pid {first}\) exited \(recycle\)")
    assert send_message(farm.port, "after@farm.test").startswith("250")


def test_reload_retires_a_recycle_replacement_still_booting(
    farms: FarmRunner, tmp_path: Path
) -> None:
    delay = tmp_path / "delay"
    delay.write_text("0")
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": "tests.support.handlers.slowboot:SlowBoot", "max_messages": 1},
        handler_args={"delay_file": str(delay)},
    )
    farm = farms.start(config=config, workers=1)
    farm.wait_ready(1)
    delay.write_text("4")  # the recycling replacement will take 4 s to boot
    assert send_message(farm.port, "one@farm.test").startswith("250")
    farm.wait_log(r"asks to be recycled: max_messages")
    delay.write_text("0")  # the reload's workers boot at once
    farm.signal(signal.SIGHUP)
    farm.wait_log(r"reload complete: generation 2 serving")
    # Once the old replacement finishes booting, it must not serve: only generation 2 runs.
    wait_for(
        lambda: [gen for _, gen in farm.workers().values()] == [2],
        what="only generation 2 left",
        timeout=30,
    )
