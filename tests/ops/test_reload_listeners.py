"""A reload that removes a listener closes it everywhere (issue 12, item 9).

Real `farm serve` processes, real SIGHUP, real sockets. Before the fix the new generation's
workers inherited the removed listener's descriptor at fork and never closed it: the port kept
accepting connections that nobody ever greeted.
"""

from __future__ import annotations

import signal
from pathlib import Path

import psutil

from tests.support.client import smtp_greeting
from tests.support.farms import FarmRunner, toml_config
from tests.support.net import free_port, refused
from tests.support.wait import wait_for


def _listening_pids(port: int, pids: list[int]) -> list[int]:
    """The processes among ``pids`` holding a socket that listens on ``port``."""
    holders = []
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
            holders.append(pid)
    return holders


def test_a_listener_removed_by_a_reload_is_closed_in_every_process(
    farms: FarmRunner, tmp_path: Path
) -> None:
    kept, removed = free_port(), free_port()
    config = tmp_path / "farm.toml"
    toml_config(
        config,
        {
            "bind": [f"127.0.0.1:{kept}", f"127.0.0.1:{removed}"],
            "handler": "farm.handlers:Sink",
            "graceful_timeout": 5,
        },
    )
    farm = farms.start(config=config, bind=None, workers=2)
    farm.port = kept
    farm.wait_ready(2)
    assert smtp_greeting(removed).startswith("220 ")

    toml_config(
        config,
        {"bind": [f"127.0.0.1:{kept}"], "handler": "farm.handlers:Sink", "graceful_timeout": 5},
    )
    mark = farm.log_size()
    farm.signal(signal.SIGHUP)
    farm.wait_log(r"reload complete: generation 2 serving", since=mark)
    new = farm.wait_workers(2, generation=2)

    # Once the old generation is gone, nobody may hold the removed listener any more.
    wait_for(lambda: refused(removed), what=f"port {removed} to refuse connections")
    everyone = [farm.pid, *new.values()]
    assert _listening_pids(removed, everyone) == []
    assert _listening_pids(kept, everyone) != []
    assert smtp_greeting(kept).startswith("220 ")
