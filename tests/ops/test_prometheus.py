"""The dashboard and the rules on a real Prometheus scraping a real farm.

A farm with two workers serves mail and is reloaded once; a ``prometheus`` (Debian package
``prometheus``) started here on a free loopback port scrapes its ``/metrics`` every second and
loads grafana/rules.yml. Then every PromQL expression of grafana/dashboard.json (with
``$__rate_interval`` = 1m and every variable matching anything) and every rule is evaluated
through the HTTP API: each must succeed and return data, every farm metric they use must exist,
no counter may have gone backwards across the reload, and no alert may fire on this healthy farm.
"""

from __future__ import annotations

import json
import shutil
import signal
import smtplib
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.ops.test_grafana import (
    RULES,
    dashboard_queries,
    label_values,
    load_dashboard,
    load_rules,
    metric_names,
    substitute,
    variable_query,
    variables,
)
from tests.support.farms import Farm, FarmRunner, toml_config
from tests.support.net import free_port
from tests.support.processes import stop_process
from tests.support.rspamd import RSPAMD
from tests.support.wait import WAIT, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMETHEUS = shutil.which("prometheus")
#: Seconds between scrapes and between rule evaluations.
INTERVAL = 1
#: What ``$__rate_interval`` becomes (Grafana: at least 4 scrape intervals).
RATE_INTERVAL = "1m"
#: The queries that must return data even before the per-worker metrics are complete.
#: Messages sent (half before the reload, half after).
SENT = 12
CORE = ("farm_messages_total", "farm_workers_ready", "farm_worker_restarts_total")


class Prometheus:
    """A ``prometheus`` process on 127.0.0.1, with its own config and storage under ``path``."""

    def __init__(self, path: Path, target: str) -> None:
        self.path = path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = path / "prometheus.log"
        config = path / "prometheus.yml"
        # YAML is a superset of JSON: no YAML library needed.
        config.write_text(
            json.dumps(
                {
                    "global": {
                        "scrape_interval": f"{INTERVAL}s",
                        "scrape_timeout": f"{INTERVAL}s",
                        "evaluation_interval": f"{INTERVAL}s",
                    },
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {"job_name": "farm", "static_configs": [{"targets": [target]}]}
                    ],
                },
                indent=2,
            )
        )
        assert PROMETHEUS is not None
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=path,
            )

    def stop(self) -> None:
        stop_process(self.proc, grace=WAIT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"prometheus exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
            )

    def get(self, path: str, **params: str) -> dict[str, Any]:
        """GET ``path`` of the HTTP API; the decoded JSON (error answers included)."""
        self.check_alive()
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            with error:
                body = error.read()
            try:
                return json.loads(body)
            except ValueError:
                return {"status": "error", "error": f"HTTP {error.code}: {body[:200]!r}"}

    def query(self, expr: str) -> dict[str, Any]:
        """Evaluate ``expr`` now (POST, as Grafana does: expressions can be long)."""
        self.check_alive()
        data = urllib.parse.urlencode({"query": expr}).encode()
        request = urllib.request.Request(f"{self.url}/api/v1/query", data=data)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            with error:
                return json.loads(error.read())

    def vector(self, expr: str) -> list[dict[str, Any]]:
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.vector(expr)
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        self.check_alive()
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def target(self) -> dict[str, Any] | None:
        targets = self.get("/api/v1/targets", state="active")["data"]["activeTargets"]
        return targets[0] if targets else None

    def scraped_after(self, moment: float) -> bool:
        """Whether a successful scrape of the farm started after ``moment`` (Unix time)."""
        target = self.target()
        if not target or target["health"] != "up":
            return False
        return _unix(target["lastScrape"]) > moment

    def rules(self) -> list[dict[str, Any]]:
        groups = self.get("/api/v1/rules")["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def evaluated_after(self, moment: float) -> bool:
        """Whether every rule group was evaluated after ``moment`` (Unix time)."""
        groups = self.get("/api/v1/rules")["data"]["groups"]
        return bool(groups) and all(_unix(g["lastEvaluation"]) > moment for g in groups)


def _unix(timestamp: str) -> float:
    """An RFC 3339 timestamp of the Prometheus API (nanoseconds are truncated) -> Unix time."""
    return datetime.fromisoformat(timestamp).timestamp()


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        path = tmp_path / f"prometheus{len(started)}"
        path.mkdir()
        prometheus = Prometheus(path, target)
        started.append(prometheus)
        wait_for(prometheus.ready, what="prometheus /-/ready")
        return prometheus

    yield start
    for prometheus in started:
        prometheus.stop()


def send_mail(port: int, count: int) -> None:
    """``count`` sessions, one message each, plus a command the server refuses (a 5xx)."""
    for n in range(count):
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=WAIT) as smtp:
            smtp.sendmail(
                "sender@client.test",
                [f"rcpt{n}@farm.test"],
                f"Subject: message {n}\r\n\r\n" + "hello world\r\n" * 100 * (n + 1),
            )
            code, _ = smtp.docmd("BOGUS")
            assert 500 <= code < 600, code


def reload(farm: Farm) -> None:
    """SIGHUP; wait until generation 2 serves with both workers."""
    farm.signal(signal.SIGHUP)
    farm.wait_metric("farm_reload_generation", 2)
    farm.wait_metric("farm_workers_ready", 2)


def has_data(answer: dict[str, Any]) -> bool:
    data = answer.get("data", {})
    if data.get("resultType") in ("scalar", "string"):
        return True
    return bool(data.get("result"))


def describe(answer: dict[str, Any]) -> str:
    if answer.get("status") != "success":
        return f"{answer.get('errorType')}: {answer.get('error')}"
    values = [sample["value"][1] for sample in answer["data"]["result"][:4]]
    return f"{len(answer['data']['result'])} series, e.g. {values}"


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not found: apt-get install prometheus")
def test_dashboard_and_rules_on_real_prometheus(
    farms: FarmRunner,
    prometheus_factory: Any,
    mail_dns: Any,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    # Debugging (not Sink): a handler with a DATA hook, so the handler-latency histogram has data.
    # Screening and authentication on (DNS from a real unbound), so their panels have data too;
    # messages are scanned by a real rspamd, so the content-scanning panels have data (without
    # rspamd installed: a dead address and on_error = "accept", counted as errors).
    if RSPAMD is not None:
        scan = {"rspamd": request.getfixturevalue("rspamd").url}
    else:
        scan = {"rspamd": f"http://127.0.0.1:{free_port()}", "on_error": "accept"}
    config = toml_config(
        tmp_path / "farm.toml",
        {"handler": "farm.handlers:Debugging"},
        limits={"exempt_networks": []},
        screening={"resolver": [mail_dns.address], "dnsbl": ["bl.test"]},
        authentication={"spf": True, "dkim": True, "arc": True, "dmarc": "report"},
        scan=scan,
    )
    farm = farms.start(config=config, workers=2)
    farm.wait_ready(2)
    assert farm.metrics_addr
    prometheus = prometheus_factory(farm.metrics_addr)
    wait_for(lambda: prometheus.scraped_after(0), what="the farm target up in prometheus")

    send_mail(farm.port, SENT // 2)
    reload(farm)
    wait_for(
        lambda: prometheus.value("max(farm_reload_generation)") == 2,
        what="prometheus to see generation 2",
    )
    send_mail(farm.port, SENT - SENT // 2)
    done = time.time()
    wait_for(lambda: prometheus.scraped_after(done), what="a scrape after the traffic")
    wait_for(lambda: prometheus.evaluated_after(done + INTERVAL), what="a rule evaluation")

    problems: list[str] = []
    empty: list[str] = []

    # -- the dashboard: variables, panels, annotations ----------------------------------------
    dashboard = load_dashboard()
    values = {"__rate_interval": RATE_INTERVAL}
    for name, variable in variables(dashboard).items():
        if variable["type"] == "query":
            values[name] = ".*"
        elif variable["type"] in ("textbox", "constant", "custom"):
            values[name] = variable_query(variable).split(",")[0]
    for name, variable in variables(dashboard).items():
        if variable["type"] != "query":
            continue
        selector, label = label_values(substitute(variable_query(variable), values))
        answer = prometheus.query(f"count by ({label}) ({selector})")
        found = sorted(s["metric"].get(label, "") for s in answer.get("data", {}).get("result", []))
        if answer["status"] != "success":
            problems.append(f"variable {name}: {describe(answer)}")
        elif not found:
            empty.append(f"variable {name}: label_values({selector}, {label})")
        elif name == "worker" and found != ["0", "1"]:
            problems.append(f"variable worker: values {found}, expected ['0', '1']")

    used: set[str] = set()
    for where, template in dashboard_queries(dashboard):
        expr = substitute(template, values)
        assert "$" not in expr, f"{where}: unsubstituted variable in {expr}"
        used |= metric_names(expr)
        answer = prometheus.query(expr)
        if answer["status"] != "success":
            problems.append(f"{where}: {describe(answer)}\n    {expr}")
        elif not has_data(answer):
            empty.append(f"{where}: {expr}")

    # -- the rules, as Prometheus loaded them -------------------------------------------------
    loaded = prometheus.rules()
    assert sorted(r["name"] for r in loaded) == sorted(r.name for r in load_rules())
    for rule in loaded:
        used |= metric_names(rule["query"])
        if rule["health"] != "ok":
            problems.append(
                f"rule {rule['name']}: health {rule['health']}: {rule.get('lastError')}"
            )
        answer = prometheus.query(rule["query"])
        if answer["status"] != "success":
            problems.append(f"rule {rule['name']}: {describe(answer)}")
        elif rule["type"] == "recording" and not has_data(answer):
            empty.append(f"rule {rule['name']}: {rule['query']}")
        if rule["type"] == "alerting" and rule["state"] == "firing":
            problems.append(f"alert {rule['name']} fires on a healthy farm: {rule['alerts']}")

    # -- every metric used exists, and no counter went backwards across the reload -------------
    present = {
        s["metric"]["__name__"] for s in prometheus.vector('count by (__name__) ({job="farm"})')
    }
    for name in sorted(used - present):
        empty.append(f"metric {name}: no series")
    for name in sorted(n for n in present if n.endswith(("_total", "_bucket"))):
        for sample in prometheus.vector(f'resets({name}{{job="farm"}}[5m]) > 0'):
            problems.append(f"went backwards: {name} {sample['metric']}")

    # Every message, before and after the reload (the new generation continues the old totals).
    accepted = prometheus.value('sum(farm_messages_total{outcome="accepted"})')
    if accepted != SENT:
        problems.append(f"accepted messages seen by prometheus: {accepted}, sent {SENT}")

    core_empty = [line for line in empty if any(name in line for name in CORE)]
    report = "\n".join(
        [f"{len(problems)} problem(s):", *problems, f"{len(empty)} without data:", *empty]
    )
    assert not core_empty, report
    assert not problems and not empty, report
