"""Per-worker metrics on the supervisor's /metrics: values, labels, continuity, bounded scrapes."""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import time
import urllib.request
from pathlib import Path

import trustme

from farm import metrics as names
from tests.support.client import send_message
from tests.support.farms import FarmRunner, toml_config
from tests.support.wait import wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def per_worker(samples: Samples, name: str, **labels: str) -> dict[str, float]:
    """``{worker: value}`` for the samples of ``name`` that carry ``labels``."""
    wanted = set(labels.items())
    out = {}
    for (sample, label_set), value in samples.items():
        if sample == name and wanted <= set(label_set):
            out[dict(label_set)["worker"]] = value
    return out


def counters(samples: Samples) -> Samples:
    return {
        key: value
        for key, value in samples.items()
        if key[0].endswith(("_total", "_count", "_sum", "_bucket"))
    }


def fail_auth(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("me")
        assert client.docmd("AUTH PLAIN AHVzZXIAd3Jvbmc=")[0] == 535


def tls_files(tmp_path: Path) -> tuple[str, str, ssl.SSLContext]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
    cert.private_key_pem.write_to_path(str(key))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return str(chain), str(key), client


def test_every_worker_metric_is_exported_with_its_slot(farms: FarmRunner, tmp_path: Path) -> None:
    chain, key, client_context = tls_files(tmp_path)
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": "tests.support.handlers.counting:Counting"},
        handler_args={"path": str(tmp_path / "delivered")},
        smtp={"auth_require_tls": False, "tls_cert": chain, "tls_key": key},
    )
    farm = farms.start(config=config, workers=2)
    farm.wait_ready(2)
    baseline = farm.metrics()  # the test helpers' own readiness probes connected too
    probes = sum(per_worker(baseline, "farm_connections_accepted_total").values())
    for n in range(6):
        assert send_message(farm.port, f"r{n}@farm.test").startswith("250")
    fail_auth(farm.port)
    with smtplib.SMTP("127.0.0.1", farm.port, timeout=10) as client:
        client.starttls(context=client_context)
        client.ehlo("me")

    def all_ended() -> dict | None:
        # A session counts as ended when its worker sees the close, which may come just after
        # the client's: wait for that, not for a lucky scrape.
        scraped = farm.metrics()
        ended = sum(per_worker(scraped, "farm_sessions_ended_total", how="quit").values())
        return scraped if ended >= 8 else None

    samples = wait_for(all_ended, what="8 sessions ended with QUIT")

    accepted = per_worker(samples, "farm_messages_total", outcome="accepted")
    assert set(accepted) <= {"0", "1"}
    assert sum(accepted.values()) == 6
    assert sum(per_worker(samples, "farm_connections_accepted_total").values()) == probes + 8
    assert sum(per_worker(samples, "farm_commands_total", verb="MAIL").values()) == 6
    assert sum(per_worker(samples, "farm_replies_total", **{"class": "2xx"}).values()) >= 30
    assert sum(per_worker(samples, "farm_replies_total", **{"class": "5xx"}).values()) == 1
    assert sum(per_worker(samples, "farm_auth_attempts_total", result="failure").values()) == 1
    assert sum(per_worker(samples, "farm_message_size_bytes_count").values()) == 6
    assert sum(per_worker(samples, "farm_received_bytes_total").values()) > 0
    assert sum(per_worker(samples, "farm_sessions_ended_total", how="quit").values()) == 8
    assert sum(per_worker(samples, "farm_banner_delay_seconds_count").values()) == probes + 8
    assert sum(per_worker(samples, "farm_tls_handshakes_total", result="ok").values()) == 1
    data_hook = per_worker(samples, "farm_handler_duration_seconds_count", hook="DATA")
    assert sum(data_hook.values()) == 6
    assert set(per_worker(samples, "farm_worker_resident_memory_bytes")) == {"0", "1"}
    assert all(v > 1e6 for v in per_worker(samples, "farm_worker_resident_memory_bytes").values())
    assert set(per_worker(samples, "farm_worker_open_fds")) == {"0", "1"}
    assert set(per_worker(samples, "farm_worker_cpu_seconds_total")) == {"0", "1"}
    assert set(per_worker(samples, "farm_loop_lag_seconds")) == {"0", "1"}
    assert samples[("farm_workers_ready", frozenset())] == 2
    listener_queue = [k for k in samples if k[0] == "farm_listener_accept_queue_limit"]
    assert listener_queue and samples[listener_queue[0]] >= 128
    # Every name exported is one farm/metrics.py defines.
    defined = {v for k, v in vars(names).items() if k.isupper() and isinstance(v, str)}
    for sample, _ in samples:
        base = sample
        for suffix in ("_total", "_bucket", "_count", "_sum", "_created", "_info"):
            base = base.removesuffix(suffix)
        assert base in defined, sample


def test_counters_never_go_backwards_across_a_restart_and_a_reload(
    farms: FarmRunner, tmp_path: Path
) -> None:
    config = toml_config(tmp_path / "farm.toml", {"handler": "farm.handlers:Sink"})
    farm = farms.start(config=config, workers=2)
    slots = farm.wait_ready(2)
    for n in range(8):
        assert send_message(farm.port, f"r{n}@farm.test").startswith("250")
    before = counters(farm.metrics())
    os.kill(slots[0], signal.SIGKILL)
    farm.wait_metric("farm_worker_restarts_total", 1, reason="crash")
    wait_for(lambda: farm.metric("farm_workers_ready") == 2, what="slot 0 refilled")
    after_crash = counters(farm.metrics())
    farm.signal(signal.SIGHUP)
    farm.wait_metric("farm_reload_generation", 2)
    for n in range(4):
        assert send_message(farm.port, f"s{n}@farm.test").startswith("250")
    after_reload = counters(farm.metrics())
    for earlier, later in ((before, after_crash), (after_crash, after_reload)):
        went_back = {k: (v, later.get(k)) for k, v in earlier.items() if later.get(k, -1) < v}
        assert not went_back
    total = sum(per_worker(after_reload, "farm_messages_total", outcome="accepted").values())
    assert total == 12


def test_a_hung_worker_delays_a_scrape_by_the_bound_and_counts_an_error(
    farms: FarmRunner, tmp_path: Path
) -> None:
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": "tests.support.handlers.blocking:Blocking", "timeout": 60},
    )
    farm = farms.start(config=config, workers=2)
    farm.wait_ready(2)
    # One worker blocks its loop for good (its heartbeat timeout is far away).
    with smtplib.SMTP("127.0.0.1", farm.port, timeout=10) as client:
        client.ehlo("me")
        client.mail("a@farm.test")
        client.rcpt("block@farm.test")
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(b"x\r\n.\r\n")  # the handler never answers
        started = time.monotonic()
        url = f"http://{farm.metrics_addr}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        took = time.monotonic() - started
    assert took < 5, f"the scrape took {took:.1f}s"
    assert 'farm_scrape_errors_total{worker="' in text
    assert "farm_workers_ready 2.0" in text


def test_openmetrics_negotiation(farms: FarmRunner, tmp_path: Path) -> None:
    config = toml_config(tmp_path / "farm.toml", {"handler": "farm.handlers:Sink"})
    farm = farms.start(config=config, workers=1)
    farm.wait_ready(1)
    request = urllib.request.Request(
        f"http://{farm.metrics_addr}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = response.read().decode()
    assert text.rstrip().endswith("# EOF")
    assert "farm_workers_ready 1.0" in text
