"""Scale-out behind a load balancer: /ready, the lame-duck stop_delay, and HAProxy in front.

The first tests need only farms: /ready through a farm's life, SIGTERM's stop_delay (and what
skips it), and a graceful stop that takes the connections already queued on the listener and
then refuses new ones. The HAProxy tests run two farms behind ``haproxy`` (TCP mode, PROXY v2,
health check ``GET /ready``): the farms see the real client addresses, and a SIGTERM to one of
them under load fails no session.
"""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from farm.config import load_config
from tests.support.client import SMTPClient, send_message, smtp_greeting
from tests.support.farms import (
    SMTP_SOURCE,
    Farm,
    FarmRunner,
    delivered,
    start_smtp_source,
    toml_config,
)
from tests.support.haproxy import (
    HAPROXY,
    Backend,
    HAProxy,
    http_get,
    needs_haproxy,
    needs_smtp_sink,
)
from tests.support.net import refused
from tests.support.processes import stop_process
from tests.support.relay import Sink
from tests.support.wait import WAIT, wait_for

COUNTING = "tests.support.handlers.counting:Counting"
PROXIED_COUNTING = "tests.support.handlers.proxied:ProxiedCounting"
PROXIED = {"proxy_protocol_timeout": 5, "proxy_trusted_networks": ["127.0.0.1/32"]}

needs_smtp_source = pytest.mark.skipif(
    not Path(SMTP_SOURCE).exists(), reason="needs Postfix's smtp-source"
)


def ready(farm: Farm) -> tuple[int, str]:
    assert farm.metrics_addr
    return http_get(farm.metrics_addr, "/ready")


# -- /ready and stop_delay --------------------------------------------------------------------


def test_ready_says_booting_then_ready_and_metrics_stay(farms: FarmRunner, tmp_path: Path) -> None:
    delay_file = tmp_path / "boot-delay"
    delay_file.write_text("5")
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": "tests.support.handlers.slowboot:SlowBoot"},
        handler_args={"delay_file": str(delay_file)},
    )
    farm = farms.start(config=config, workers=1)
    assert ready(farm) == (503, "booting\n")  # the worker sleeps 5 s before READY
    farm.wait_ready(1)
    assert ready(farm) == (200, "ready\n")
    status, text = http_get(farm.metrics_addr or "", "/metrics")
    assert status == 200 and "farm_workers_ready 1.0" in text
    assert http_get(farm.metrics_addr or "", "/nothing")[0] == 404


def test_term_with_stop_delay_serves_on_with_ready_503(farms: FarmRunner, tmp_path: Path) -> None:
    out = tmp_path / "delivered"
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": COUNTING, "stop_delay": 3},
        handler_args={"path": str(out)},
    )
    farm = farms.start(config=config, workers=2)
    farm.wait_ready(2)
    assert ready(farm) == (200, "ready\n")
    mark = farm.log_size()
    sent_at = time.monotonic()
    farm.signal(signal.SIGTERM)
    wait_for(lambda: ready(farm)[0] == 503, what="/ready at 503")
    assert ready(farm) == (503, "stopping\n")
    # Meanwhile everything is served as usual: a load balancer takes us out, nobody is refused.
    assert send_message(farm.port, "during@farm.test").startswith("250 ")
    assert smtp_greeting(farm.port).startswith("220 ")
    assert farm.wait_exit() == 0  # (it may be gone before a log poll sees its last lines)
    assert time.monotonic() - sent_at >= 3 - 0.5  # the supervisor's loop ticks every 0.1 s
    assert "graceful stop: 2 worker(s)" in farm.log()[mark:]
    assert [line.split()[1] for line in delivered(out)] == ["during@farm.test"]
    log = farm.log()[mark:]
    assert "stopping in 3s" in log
    assert log.index("stopping in 3s") < log.index("graceful stop")


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGTERM, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT), (signal.SIGINT, None)],
    ids=["term-term", "term-int", "int"],
)
def test_a_second_term_or_a_fast_stop_skips_the_delay(
    farms: FarmRunner, tmp_path: Path, first: int, second: int | None
) -> None:
    config = toml_config(
        tmp_path / "farm.toml", {"handler": "farm.handlers:Sink", "stop_delay": 600}
    )
    farm = farms.start(config=config, workers=1)
    farm.wait_ready(1)
    farm.signal(first)
    if second is not None:
        wait_for(lambda: ready(farm)[0] == 503, what="/ready at 503")
        farm.wait_log(r"stopping in 600s")
        farm.signal(second)
    assert farm.wait_exit() == 0  # within WAIT, far from the 600 s delay
    assert ("graceful stop" if second == signal.SIGTERM else "fast stop") in farm.log()


def test_graceful_stop_takes_queued_connections_then_refuses(
    farms: FarmRunner, tmp_path: Path
) -> None:
    """Connections queued on the listener when the stop begins are served, not reset.

    One worker at its session cap (1) stops accepting; three clients then sit in the kernel's
    accept queue, their commands up to DATA already sent. On SIGTERM the worker takes them and
    closes its listener copies (as does the supervisor): new connections are refused while
    the queued clients are still served.
    """
    out = tmp_path / "delivered"
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": COUNTING, "max_sessions": 1, "graceful_timeout": 20},
        handler_args={"path": str(out)},
        # The queued clients send up to DATA while they wait to be accepted, so that they are
        # inside a transaction when the stop begins: ahead of the replies, on purpose.
        smtp={"forbid_unauth_pipelining": False},
    )
    farm = farms.start(config=config, workers=1)
    farm.wait_ready(1)
    mark = farm.log_size()
    holder = SMTPClient(farm.port)
    queued: list[SMTPClient] = []
    try:
        assert holder.reply().startswith("220 ")
        assert holder.command("EHLO holder.test").startswith("250")
        farm.wait_log(r"at the cap: not accepting", since=mark)
        queued = [SMTPClient(farm.port) for _ in range(3)]  # the kernel completes these
        for i, client in enumerate(queued):
            client.send(
                f"EHLO queued.test\r\nMAIL FROM:<s@client.test>\r\n"
                f"RCPT TO:<queued{i}@farm.test>\r\nDATA\r\n"
            )
        farm.signal(signal.SIGTERM)
        for client in queued:
            assert client.reply().startswith("220 ")
            for expected in ("250", "250", "250", "354"):
                assert client.reply().startswith(expected)
        assert refused(farm.port)  # every copy of the listener is closed: nothing queues
        assert farm.proc.poll() is None  # while the taken sessions are still being served
        assert ready(farm) == (503, "stopping\n")  # metrics and /ready stay up to the end
        for client in queued:
            assert client.command("Subject: q\r\n\r\nqueued\r\n.").startswith("250 ")
            # Then QUIT, or the drain's 421 if the stop's grace for new sessions ran out.
            assert client.command("QUIT")[:3] in ("221", "421", "")
        # The holder, idle without a transaction, is told 421 once that grace is over.
        assert holder.reply() == "421 4.3.2 Service shutting down\r\n"
    finally:
        for client in [holder, *queued]:
            client.close()
    assert farm.wait_exit() == 0
    assert sorted(line.split()[1] for line in delivered(out)) == [
        f"queued{i}@farm.test" for i in range(3)
    ]
    assert re.search(r"took 3 queued connection\(s\) on stopping", farm.log())


# -- HAProxy in front of two farms ------------------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_section() -> str:
    text = README.read_text()
    start = text.index("### Scale-out behind HAProxy")
    return text[start : text.index("\n## ", start)]


@needs_haproxy
def test_readme_haproxy_example_is_valid(tmp_path: Path) -> None:
    section = _readme_section()
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.DOTALL)
    cfg = next(body for lang, body in blocks if body.startswith("global\n"))
    toml = next(body for lang, body in blocks if lang == "toml")
    for needed in ("mode tcp", "send-proxy-v2", "option httpchk GET /ready", "option redispatch"):
        assert needed in cfg
    (tmp_path / "haproxy.cfg").write_text(cfg)
    check = subprocess.run(
        [HAPROXY or "haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / "farm.toml").write_text(toml)
    config = load_config(str(tmp_path / "farm.toml"))
    assert config.stop_delay == 5.0
    assert config.smtp.proxy_protocol_timeout == 5.0
    assert config.smtp.proxy_trusted_networks == ("10.0.0.2/32",)


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[list[HAProxy]]:
    """HAProxy instances a test started; stopped by pid at teardown."""
    started: list[HAProxy] = []
    yield started
    for proxy in started:
        proxy.stop()


def start_pair(
    farms: FarmRunner,
    proxies: list[HAProxy],
    tmp_path: Path,
    top: dict[str, Any],
    handler_args: list[dict[str, Any]],
    workers: int = 2,
) -> tuple[HAProxy, list[Farm]]:
    """Two farms behind one HAProxy; returns once HAProxy sees both UP."""
    pair = []
    for i, args in enumerate(handler_args, 1):
        config = toml_config(tmp_path / f"farm{i}.toml", top, handler_args=args, smtp=PROXIED)
        pair.append(farms.start(config=config, workers=workers))
    for farm in pair:  # not wait_ready(): a direct client gets no greeting without PROXY
        farm.wait_metric("farm_workers_ready", workers)
        farm.wait_workers(workers)
    backends = [
        Backend(f"farm{i}", farm.port, int((farm.metrics_addr or "").rpartition(":")[2]))
        for i, farm in enumerate(pair, 1)
    ]
    proxy = HAProxy(tmp_path, backends)
    proxies.append(proxy)
    proxy.wait_statuses({"farm1": "UP", "farm2": "UP"})
    return proxy, pair


MESSAGE = "From: a@client.test\r\nTo: x@foreign.test\r\nSubject: {n}\r\n\r\nbody {n}\r\n"


@needs_haproxy
@needs_smtp_sink
def test_behind_haproxy_the_farms_see_the_real_client_address(
    farms: FarmRunner, proxies: list[HAProxy], sink: Callable[..., Sink], tmp_path: Path
) -> None:
    next_hop = sink()  # tests/support/relay.py's smtp-sink
    relay_args = {
        "next_hop": next_hop.next_hop,
        "domains": ["ours.test"],
        "trusted_networks": ["127.0.0.2/32"],
    }
    proxy, pair = start_pair(
        farms, proxies, tmp_path, {"handler": "farm.relay:Relay"}, [relay_args, relay_args]
    )
    for n in range(4):  # round robin: two through each farm
        with smtplib.SMTP(
            "127.0.0.1", proxy.port, source_address=("127.0.0.2", 0), timeout=WAIT
        ) as client:
            refused_rcpts = client.sendmail(
                "a@client.test", ["x@foreign.test"], MESSAGE.format(n=n)
            )
            assert refused_rcpts == {}
    with smtplib.SMTP(
        "127.0.0.1", proxy.port, source_address=("127.0.0.3", 0), timeout=WAIT
    ) as client:
        client.ehlo("untrusted.test")
        assert client.mail("a@client.test")[0] == 250
        code, text = client.rcpt("x@foreign.test")
        assert (code, text) == (550, b"5.7.1 Relay access denied")
        assert client.rcpt("postmaster@ours.test")[0] == 250  # our own domain: fine

    dump = next_hop.wait_for(b"Subject:", 4).decode(errors="replace")
    received = re.findall(r"^Received: from \S+ \(\[([^\]]+)\]\)\s+by \S+ \(farm\)", dump, re.M)
    assert received == ["127.0.0.2"] * 4, dump
    assert sorted(re.findall(r"^Subject: (\d)", dump, re.MULTILINE)) == ["0", "1", "2", "3"]
    for farm in pair:  # each farm relayed some of them: both see the real address
        farm.wait_log(r" outcome=250 .*next_hop=")  # (a worker writes its lines within 100 ms)
    assert "127.0.0.3" not in dump
    # The refusal is logged with the client's address, not HAProxy's.
    wait_for(
        lambda: any("relay denied client=127.0.0.3 " in farm.log() for farm in pair),
        what="the refusal logged with the real client address",
    )


@needs_haproxy
@needs_smtp_source
@pytest.mark.slow
@pytest.mark.parametrize("stop_delay", [2, 0], ids=["stop_delay=2", "stop_delay=0"])
def test_term_to_one_farm_under_haproxy_load_fails_no_session(
    farms: FarmRunner, proxies: list[HAProxy], tmp_path: Path, stop_delay: float
) -> None:
    """smtp-source through HAProxy to two farms; SIGTERM to one of them mid-run.

    With ``stop_delay`` the health check takes the farm out before it stops accepting. Without,
    the stop itself must lose nothing: connections already queued are taken and served, then
    the listener is closed, so HAProxy's next attempts are refused and redispatched.
    """
    outs = [tmp_path / "delivered1", tmp_path / "delivered2"]
    top = {"handler": PROXIED_COUNTING, "stop_delay": stop_delay, "graceful_timeout": 20}
    # 20 ms per DATA: at most 500 messages/s with 10 sessions, so the load outlasts the stop.
    args = [{"path": str(out), "delay": 0.02} for out in outs]
    proxy, (first, second) = start_pair(farms, proxies, tmp_path, top, args)
    total = 3000
    source = start_smtp_source(
        proxy.port, "-s", "10", "-m", str(total), "-l", "512", "-N", "-t", "r@farm.test"
    )
    try:
        wait_for(
            lambda: source.poll() is None and len(delivered(outs[0])) >= 200,
            what="200 messages through the first farm",
        )
        second_at_term = len(delivered(outs[1]))
        first.signal(signal.SIGTERM)
        if stop_delay:
            proxy.wait_statuses({"farm1": "DOWN", "farm2": "UP"})  # /ready said 503
        code = first.wait_exit(60)
        assert source.poll() is None, "the load ended before the farm had stopped"
        second_at_exit = len(delivered(outs[1]))
        out, err = source.communicate(timeout=180)
    finally:
        stop_process(source)
    assert code == 0
    assert source.returncode == 0, err
    assert [line for line in (out + err).splitlines() if line.strip()] == []
    recipients = [line.split()[1] for line in delivered(outs[0]) + delivered(outs[1])]
    assert len(recipients) == total
    assert len(set(recipients)) == total  # nothing accepted twice
    assert second_at_term < second_at_exit < len(delivered(outs[1]))  # the second took over
    assert second.proc.poll() is None
    log = first.log()
    assert "graceful stop" in log
    for bad in ("SIGKILL", "Traceback", "aborted"):
        assert bad not in log
