"""Lint of the Grafana dashboard and the Prometheus rules in grafana/ (fast, no network).

The dashboard follows grafana/dashboard-linter's conventions: a ``datasource`` variable that every
panel uses, ``job``/``instance``/``worker`` variables that every query filters on,
``$__rate_interval`` in every range, ``histogram_quantile`` over ``sum by (le)``. Every metric
name in the dashboard and in the rules must be one that farm/metrics.py defines, with the
suffixes of its type (``_total`` for counters, ``_bucket``/``_sum``/``_count`` for histograms,
``_info`` for the Info), and every metric farm/metrics.py defines must be on the dashboard.
``promtool check rules`` and ``promtool test rules`` run when promtool is installed (Debian
package ``prometheus``).

The parsing helpers here are also used by tests/ops/test_prometheus.py, which evaluates the same
expressions on a real Prometheus.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from farm import metrics

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"
DASHBOARD = GRAFANA / "dashboard.json"
RULES = GRAFANA / "rules.yml"
RULES_TEST = GRAFANA / "rules.test.yml"
PROVISIONING = GRAFANA / "provisioning"

PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = (
    "promtool not found: install the Debian package `prometheus` (apt-get install prometheus)"
)

REQUIRED_VARIABLES = ("datasource", "job", "instance", "worker")
REQUIRED_ROWS = ["Overview", "SMTP", "Per worker", "Saturation", "Mail checks", "Content scanning"]
REQUIRED_ALERTS = {
    "FarmWorkerCrashLoop",
    "FarmWorkersBelowDesired",
    "FarmWorkerHung",
    "FarmHighErrorRatio",
    "FarmAcceptQueueNearBacklog",
    "FarmScrapeErrors",
    "FarmReloadFailed",
    "FarmUnevenLoad",
}
SEVERITIES = {"critical", "warning", "info"}
DATASOURCE_UIDS = {"${datasource}", "$datasource"}
PANEL_TYPES = {"row", "timeseries", "stat", "table", "state-timeline", "bargauge", "gauge", "text"}
RATE_FUNCTIONS = {"rate", "irate", "increase"}

# -- metric catalogue (farm/metrics.py) ---------------------------------------------------------


@dataclass(frozen=True)
class MetricInfo:
    name: str  #: the base name, as defined in farm/metrics.py
    kind: str  #: counter, gauge, histogram or info
    per_worker: bool  #: whether the series carry a ``worker`` label

    def sample_names(self) -> set[str]:
        """The names its series have in Prometheus."""
        if self.kind == "counter":
            return {self.name + "_total"}
        if self.kind == "histogram":
            return {self.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        if self.kind == "info":
            return {self.name + "_info"}
        return {self.name}


_DEFINITION = re.compile(r'^[A-Z][A-Z0-9_]* = "(farm_\w+)"[ \t]*(?:#[ \t]*(.*))?$', re.MULTILINE)


@functools.cache
def metric_catalogue() -> dict[str, MetricInfo]:
    """Every metric farm/metrics.py defines: {base name: MetricInfo}.

    The names are the module's string constants. Their types come from the families the module
    builds (a worker's :class:`WorkerStats`, the :class:`SupervisorMetrics` registry) and, for
    metrics built elsewhere, from the comment next to the constant (``# counter {worker}``).
    Every metric a worker exports carries a ``worker`` label (added by the supervisor).
    """
    names = {
        value
        for key, value in vars(metrics).items()
        if key.isupper() and isinstance(value, str) and value.startswith("farm_")
    }
    comments = dict(_DEFINITION.findall(inspect.getsource(metrics)))
    kinds: dict[str, str] = {}
    labelled: set[str] = set()
    for name, comment in comments.items():
        kind = re.match(r"(counter|gauge|histogram|info)\b", comment)
        if kind:
            kinds[name] = kind[1]
        if "{worker}" in comment.replace(" ", ""):
            labelled.add(name)
    worker_families = list(metrics.WorkerStats().families())
    for family in worker_families:
        kinds[family.name] = family.type
        labelled.add(family.name)
    supervisor = metrics.SupervisorMetrics()
    for family in supervisor.registry.collect():
        kinds[family.name] = family.type
    for attribute in vars(supervisor).values():
        if "worker" in getattr(attribute, "_labelnames", ()):
            labelled.add(attribute._name)
    return {name: MetricInfo(name, kinds.get(name, "gauge"), name in labelled) for name in names}


@functools.cache
def sample_names() -> dict[str, MetricInfo]:
    """{name of a series in Prometheus: the metric it belongs to}."""
    return {sample: info for info in metric_catalogue().values() for sample in info.sample_names()}


# -- PromQL scanning ----------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(
        "(?:[^"\\]|\\.)*" | '(?:[^'\\]|\\.)*' | `[^`]*`   # strings
        | \$\{\w+\} | \$\w+                               # dashboard variables
        | [A-Za-z_:][\w:]*                                # identifiers
        | \d[\w.]*                                        # numbers and durations
        | =~ | !~ | != | == | >= | <=                     # two-character operators
        | \S
    )""",
    re.VERBOSE,
)
_FARM_METRIC = re.compile(r"farm_\w+")


def tokens(expr: str) -> list[str]:
    """PromQL tokens (strings kept whole, so that label values are never taken for names)."""
    return [m[1] for m in _TOKEN.finditer(expr)]


@dataclass
class Selector:
    """One ``farm_…{…}`` vector selector of an expression."""

    name: str
    matchers: dict[str, tuple[str, str]] = field(default_factory=dict)  #: label: (op, value)
    range: str | None = None  #: the range in ``[...]``, if any
    function: str | None = None  #: the function whose argument it is, if directly one


def selectors(expr: str) -> list[Selector]:
    """The selectors of every ``farm_`` metric in ``expr``."""
    toks = tokens(expr)
    found = []
    for i, tok in enumerate(toks):
        if not _FARM_METRIC.fullmatch(tok):
            continue
        selector = Selector(tok)
        if i >= 2 and toks[i - 1] == "(" and re.fullmatch(r"[a-z_]+", toks[i - 2]):
            selector.function = toks[i - 2]
        j = i + 1
        if j < len(toks) and toks[j] == "{":
            j += 1
            while j < len(toks) and toks[j] != "}":
                if toks[j] == ",":
                    j += 1
                    continue
                label, op, value = toks[j : j + 3]
                selector.matchers[label] = (op, json.loads(value) if value[0] == '"' else value)
                j += 3
            j += 1
        if j < len(toks) and toks[j] == "[":
            end = toks.index("]", j)
            selector.range = "".join(toks[j + 1 : end])
        found.append(selector)
    return found


def metric_names(expr: str) -> set[str]:
    return {selector.name for selector in selectors(expr)}


def ranges(expr: str) -> list[str]:
    """The content of every ``[...]`` of ``expr`` (range selectors and subqueries)."""
    toks = tokens(expr)
    out = []
    for i, tok in enumerate(toks):
        if tok == "[":
            out.append("".join(toks[i + 1 : toks.index("]", i)]))
    return out


def quantile_inner(expr: str) -> list[str]:
    """For each ``histogram_quantile(q, inner)`` of ``expr``: the start of ``inner``."""
    return [expr[m.end() :] for m in re.finditer(r"histogram_quantile\s*\(\s*[^,()]+,\s*", expr)]


# -- dashboard ----------------------------------------------------------------------------------


@functools.cache
def _dashboard_text() -> str:
    return DASHBOARD.read_text()


def load_dashboard() -> dict[str, Any]:
    return json.loads(_dashboard_text())


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels of collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every PromQL query: panel targets and Prometheus annotations."""
    queries = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            queries.append((f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            queries.append((f"annotation {annotation.get('name')!r}", annotation["expr"]))
    return queries


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query", "")
    return query.get("query", "") if isinstance(query, dict) else query


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


_LABEL_VALUES = re.compile(r"^label_values\((.+),\s*(\w+)\)$")


def label_values(query: str) -> tuple[str, str]:
    """``label_values(selector, label)`` -> (selector, label)."""
    match = _LABEL_VALUES.match(query.strip())
    assert match, f"not a label_values(metric, label) query: {query!r}"
    return match[1], match[2]


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace ``$name`` and ``${name}`` by ``values[name]``."""

    def replace(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        return values.get(name, match[0])

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


# -- rules (a small reader for Prometheus rule files: PyYAML is not a dependency) ----------------


@dataclass
class Rule:
    kind: str  #: "record" or "alert"
    name: str
    expr: str = ""
    duration: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return json.loads(value)
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1].replace("''", "'")
    return value


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _value(lines: list[str], i: int, indent: int, head: str) -> tuple[str | dict[str, str], int]:
    """The value of the key on line ``i - 1`` (at ``indent``) whose inline part is ``head``.

    Returns (value, index of the next line). A block scalar (``|``, ``>``) is returned as
    text, a nested mapping as {key: scalar}.
    """
    body = []
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
        body.append(lines[i])
        i += 1
    while body and not body[-1].strip():
        body.pop()
    if head[:1] in ("|", ">"):
        depth = min(_indent(line) for line in body if line.strip())
        text = [line[depth:] for line in body]
        return ("\n".join(text) if head[0] == "|" else " ".join(t for t in text if t)), i
    if head:
        return _unquote(head), i
    mapping: dict[str, str] = {}
    j = 0
    while j < len(body):
        line = body[j]
        j += 1
        match = re.match(r"^\s*([\w.-]+):\s*(.*?)\s*$", line)
        if not match or line.lstrip().startswith("#"):
            continue
        value, j = _value(body, j, _indent(line), match[2])
        mapping[match[1]] = value if isinstance(value, str) else ""
    return mapping, i


def parse_rules(text: str) -> list[Rule]:
    """The rules of a Prometheus rule file written in block style (as grafana/rules.yml is).

    The number found is checked against ``promtool check rules`` where promtool is installed.
    """
    lines = text.splitlines()
    rules: list[Rule] = []
    rule: Rule | None = None
    key_indent = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        start = re.match(r"^(\s*)- (record|alert):\s*(.+?)\s*$", line)
        if start:
            rule = Rule(start[2], _unquote(start[3]))
            rules.append(rule)
            key_indent = len(start[1]) + 2
            continue
        if rule is None or _indent(line) != key_indent:
            if rule is not None and _indent(line) < key_indent:
                rule = None
            continue
        match = re.match(r"^\s*(\w+):\s*(.*?)\s*$", line)
        if not match:
            continue
        value, i = _value(lines, i, key_indent, match[2])
        if match[1] == "expr" and isinstance(value, str):
            rule.expr = value.strip()
        elif match[1] == "for" and isinstance(value, str):
            rule.duration = value
        elif match[1] in ("labels", "annotations") and isinstance(value, dict):
            setattr(rule, match[1], value)
    return rules


@functools.cache
def load_rules() -> tuple[Rule, ...]:
    return tuple(parse_rules(RULES.read_text()))


# -- the dashboard ------------------------------------------------------------------------------


def test_dashboard_is_current_json() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "farm"
    assert dashboard["title"] == "farm"
    assert dashboard.get("id") is None, "a provisioned dashboard has id null"
    assert "__inputs" not in dashboard, "no export placeholders: the datasource is a variable"
    types = {panel["type"] for panel in iter_panels(dashboard)}
    assert types <= PANEL_TYPES, f"legacy or unexpected panel types: {types - PANEL_TYPES}"


def test_dashboard_variables() -> None:
    dashboard = load_dashboard()
    found = variables(dashboard)
    assert set(REQUIRED_VARIABLES) <= set(found), f"missing variables: {found.keys()}"
    datasource = found["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    for name in ("job", "instance", "worker"):
        variable = found[name]
        assert variable["type"] == "query", name
        assert variable["datasource"]["uid"] in DATASOURCE_UIDS, name
        assert variable["multi"] is True, name
        assert variable["includeAll"] is True, name
        assert variable.get("allValue") == ".+", f"{name}: All should match any value (.+)"
        assert variable.get("refresh") == 2, f"{name}: refresh the values on time range change"
        selector, label = label_values(variable_query(variable))
        assert label == name
        (metric,) = selectors(selector)
        assert metric.name in sample_names(), f"{name}: unknown metric {metric.name}"
        if name == "instance":
            assert metric.matchers.get("job") == ("=~", "$job")
        if name == "worker":
            assert sample_names()[metric.name].per_worker, f"{metric.name} has no worker label"
            assert metric.matchers.get("job") == ("=~", "$job")
            assert metric.matchers.get("instance") == ("=~", "$instance")


def test_dashboard_rows() -> None:
    rows = [panel["title"] for panel in load_dashboard()["panels"] if panel["type"] == "row"]
    assert rows == REQUIRED_ROWS


def test_dashboard_layout() -> None:
    dashboard = load_dashboard()
    ids = [panel["id"] for panel in iter_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in iter_panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_panel_uses_the_datasource_variable() -> None:
    for panel in iter_panels(load_dashboard()):
        if panel["type"] == "row":
            continue
        title = panel.get("title")
        assert title and panel.get("description"), f"panel {panel['id']} needs a title and text"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel.get("targets"), f"{title!r} has no queries"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target.get("expr"), title
            if "datasource" in target:
                assert target["datasource"]["uid"] in DATASOURCE_UIDS, title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title!r} has no unit"


def test_reloads_are_annotated() -> None:
    annotations = load_dashboard()["annotations"]["list"]
    prometheus = [a for a in annotations if a.get("expr")]
    for annotation in prometheus:
        assert annotation["datasource"]["uid"] in DATASOURCE_UIDS, annotation["name"]
    assert any(re.match(r"changes\(farm_reload_generation\{", a["expr"]) for a in prometheus), (
        "an annotation on changes of farm_reload_generation"
    )


def test_every_range_is_the_rate_interval() -> None:
    for where, expr in dashboard_queries(load_dashboard()):
        found = ranges(expr)
        assert all(r == "$__rate_interval" for r in found), f"{where}: {expr}"
        for call in re.finditer(r"\b(rate|irate|increase|changes|\w+_over_time)\s*\(", expr):
            assert found, f"{where}: {call[1]}() without a range: {expr}"


def test_histogram_quantile_sums_by_le() -> None:
    quantiles = 0
    for where, expr in dashboard_queries(load_dashboard()):
        for inner in quantile_inner(expr):
            quantiles += 1
            assert re.match(r"sum\s+by\s*\(\s*le\s*[,)]", inner), f"{where}: {expr}"
    assert quantiles, "the dashboard has latency quantiles"


def test_every_query_filters_on_job_instance_and_worker() -> None:
    catalogue = sample_names()
    for where, expr in dashboard_queries(load_dashboard()):
        found = selectors(expr)
        assert found, f"{where}: no farm metric in {expr}"
        for selector in found:
            assert selector.matchers.get("job") == ("=~", "$job"), f"{where}: {expr}"
            assert selector.matchers.get("instance") == ("=~", "$instance"), f"{where}: {expr}"
            info = catalogue.get(selector.name)
            if info is not None and info.per_worker:
                assert selector.matchers.get("worker") == ("=~", "$worker"), f"{where}: {expr}"


def _check_rated(where: str, expr: str) -> None:
    """Counters and histogram parts only inside rate()/increase(); gauges never there."""
    catalogue = sample_names()
    for selector in selectors(expr):
        info = catalogue.get(selector.name)
        if info is None:
            continue  # reported by the metric-name tests
        cumulative = info.kind in ("counter", "histogram")
        rated = selector.range is not None and selector.function in RATE_FUNCTIONS
        if cumulative:
            assert rated, f"{where}: {selector.name} outside rate()/increase(): {expr}"
        else:
            assert selector.function not in RATE_FUNCTIONS, f"{where}: rate of a {info.kind}"


def test_counters_are_rated() -> None:
    for where, expr in dashboard_queries(load_dashboard()):
        _check_rated(where, expr)
    for rule in load_rules():
        _check_rated(rule.name, rule.expr)


def _undefined(names: set[str]) -> set[str]:
    return names - set(sample_names())


def test_dashboard_metric_names_are_defined() -> None:
    dashboard = load_dashboard()
    used = set()
    for _, expr in dashboard_queries(dashboard):
        used |= metric_names(expr)
    for variable in variables(dashboard).values():
        if variable["type"] == "query":
            used |= metric_names(variable_query(variable))
    # Any farm_ identifier anywhere in the file, not only the ones found in queries.
    anywhere = set(re.findall(r"(?<![\w:])farm_\w+", _dashboard_text()))
    assert used, "no farm metrics found"
    assert not _undefined(used | anywhere), "not defined in farm/metrics.py"


def test_rules_metric_names_are_defined() -> None:
    used = set()
    for rule in load_rules():
        names = metric_names(rule.expr)
        assert names, f"{rule.name}: no farm metric in {rule.expr!r}"
        used |= names
    assert not _undefined(used), "not defined in farm/metrics.py"


def test_every_metric_is_on_the_dashboard() -> None:
    """A metric farm/metrics.py defines but nobody graphs is a dashboard to update."""
    used = set()
    for _, expr in dashboard_queries(load_dashboard()):
        used |= metric_names(expr)
    missing = {info.name for info in metric_catalogue().values() if not info.sample_names() & used}
    assert not missing, f"metrics missing from grafana/dashboard.json: {sorted(missing)}"


def test_name_check_knows_the_types() -> None:
    """The catalogue maps the names the way prometheus_client exposes them."""
    names = sample_names()
    assert names["farm_messages_total"].kind == "counter"
    assert "farm_messages" not in names
    assert names["farm_workers_ready"].kind == "gauge"
    assert names["farm_build_info"].kind == "info"
    assert names["farm_message_size_bytes_bucket"].kind == "histogram"
    assert names["farm_sessions_active"].per_worker
    assert not names["farm_workers_ready"].per_worker
    assert names["farm_worker_cpu_seconds_total"].per_worker
    assert metric_names('sum(rate(farm_x_total{a="farm_y"}[1m])) / farm:z:rate5m') == {
        "farm_x_total"
    }


# -- the rules ----------------------------------------------------------------------------------


def test_rules_are_named_and_labelled() -> None:
    rules = load_rules()
    alerts = {rule.name: rule for rule in rules if rule.kind == "alert"}
    assert set(alerts) >= REQUIRED_ALERTS, f"missing alerts: {REQUIRED_ALERTS - set(alerts)}"
    for rule in alerts.values():
        assert rule.labels.get("severity") in SEVERITIES, rule.name
        assert rule.annotations.get("summary"), rule.name
        assert rule.annotations.get("description"), rule.name
    records = [rule for rule in rules if rule.kind == "record"]
    assert {"farm:messages:rate5m", "farm:replies_error_ratio:rate5m"} <= {r.name for r in records}
    for rule in records:
        assert re.fullmatch(r"farm:[a-z0-9_]+:[a-z0-9_]+", rule.name), rule.name
    for rule in rules:
        for inner in quantile_inner(rule.expr):
            assert re.match(r"sum\s+by\s*\([^)]*\ble\b", inner), rule.name


def test_every_alert_fires_and_stays_quiet_in_the_unit_tests() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for block in re.split(r"\n\s*- eval_time:", RULES_TEST.read_text())[1:]:
        name = re.search(r"alertname:\s*(\w+)", block)
        assert name, block
        if re.search(r"exp_alerts:\s*\[\s*\]", block):
            quiet.add(name[1])
        elif re.search(r"exp_alerts:\s*\n\s*- exp_labels:", block):
            fires.add(name[1])
    alerts = {rule.name for rule in load_rules() if rule.kind == "alert"}
    assert alerts - fires == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"


def test_rule_reader() -> None:
    rules = parse_rules(
        "groups:\n"
        "  - name: g\n"
        "    rules:\n"
        "      - record: farm:a:b\n"
        "        expr: sum(farm_x)\n"
        "      - alert: A\n"
        "        expr: |\n"
        "          farm_y\n"
        "            > 1\n"
        "        for: 5m\n"
        "        labels:\n"
        "          severity: warning\n"
        "        annotations:\n"
        '          summary: "s {{ $labels.x }}"\n'
        "          description: >-\n"
        "            one\n"
        "            two\n"
        "  - name: h\n"
        "    rules:\n"
        "      - alert: 'B'\n"
        "        expr: farm_z == 0\n"
    )
    assert [(r.kind, r.name, r.expr) for r in rules] == [
        ("record", "farm:a:b", "sum(farm_x)"),
        ("alert", "A", "farm_y\n  > 1"),
        ("alert", "B", "farm_z == 0"),
    ]
    assert rules[1].duration == "5m"
    assert rules[1].labels == {"severity": "warning"}
    assert rules[1].annotations == {"summary": "s {{ $labels.x }}", "description": "one two"}


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_check_rules() -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"SUCCESS: (\d+) rules found", result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    assert int(found[1]) == len(load_rules()), "the rule reader missed some rules"


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_test_rules() -> None:
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(RULES_TEST)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=GRAFANA,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- provisioning -------------------------------------------------------------------------------


def test_provisioning_files() -> None:
    dashboards = (PROVISIONING / "dashboards" / "farm.yaml").read_text()
    assert re.search(r"^apiVersion: 1$", dashboards, re.MULTILINE)
    assert re.search(r"^providers:$", dashboards, re.MULTILINE)
    assert re.search(r"^\s+type: file$", dashboards, re.MULTILINE)
    assert re.search(r"^\s+path: /\S+$", dashboards, re.MULTILINE)
    datasources = (PROVISIONING / "datasources" / "prometheus.yaml").read_text()
    assert re.search(r"^apiVersion: 1$", datasources, re.MULTILINE)
    assert re.search(r"^datasources:$", datasources, re.MULTILINE)
    assert re.search(r"^\s+type: prometheus$", datasources, re.MULTILINE)
    assert re.search(r"^\s+access: proxy$", datasources, re.MULTILINE)
    assert re.search(r"^\s+url: https?://\S+$", datasources, re.MULTILINE)
