"""Every metric name the farm exports, defined once (invariant 7).

Workers count with plain integers (:class:`WorkerStats`: a dict increment on the hot path, no
locks, no prometheus objects); a scrape turns them into metric families. The supervisor adds
the ``worker`` label (the slot), keeps each slot's totals across restarts so that no counter
ever goes backwards, and adds its own metrics.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

# -- names: workers ----------------------------------------------------------------------------
CONNECTIONS = "farm_connections_accepted"  # counter
SESSIONS_ACTIVE = "farm_sessions_active"  # gauge
SESSIONS_ENDED = "farm_sessions_ended"  # counter {how}
COMMANDS = "farm_commands"  # counter {verb}
REPLIES = "farm_replies"  # counter {class}
MESSAGES = "farm_messages"  # counter {outcome}
RECEIVED_BYTES = "farm_received_bytes"  # counter
MESSAGE_SIZE = "farm_message_size_bytes"  # histogram
HANDLER_DURATION = "farm_handler_duration_seconds"  # histogram {hook}
BANNER_DELAY = "farm_banner_delay_seconds"  # histogram
TLS_HANDSHAKES = "farm_tls_handshakes"  # counter {result}
AUTH_ATTEMPTS = "farm_auth_attempts"  # counter {result}
LOOP_LAG = "farm_loop_lag_seconds"  # gauge
SESSIONS_DRAINING = "farm_sessions_draining"  # gauge
SESSIONS_LIMIT = "farm_sessions_limit"  # gauge: max_sessions, where the worker stops accepting
CLIENT_LIMITED = "farm_client_limit_refusals"  # counter {limit}: per-IP limits ([limits])
#: counter {kind}: clients refused for sending before the greeting or a reply
PROTOCOL_VIOLATIONS = "farm_protocol_violations"
SCREENING_RESULTS = "farm_screening_results"  # counter {list,result}: DNS list lookups
SCREENING_VERDICTS = "farm_screening_verdicts"  # counter {verdict}: pass, listed, exempt
SCREENING_CACHE = "farm_screening_cache_lookups"  # counter {result}: farm-wide cache hit/miss
AUTHENTICATION_RESULTS = "farm_authentication_results"  # counter {method,result}
AUTHENTICATION_ACTIONS = "farm_authentication_actions"  # counter {action}
DNS_LOOKUP_DURATION = "farm_dns_lookup_duration_seconds"  # histogram {check}
SCAN_RESULTS = "farm_scan_results"  # counter {scanner, action}: content scanning ([scan])
SCAN_DURATION = "farm_scan_duration_seconds"  # histogram {scanner}

# -- names: supervisor --------------------------------------------------------------------------
WORKERS_DESIRED = "farm_workers_desired"
WORKERS_READY = "farm_workers_ready"
WORKER_RESTARTS = "farm_worker_restarts"  # counter {reason}
WORKER_BACKOFF = "farm_worker_backoff_seconds"  # gauge {worker}
RELOAD_GENERATION = "farm_reload_generation"
RELOAD_LAST_TIMESTAMP = "farm_reload_last_timestamp_seconds"
RELOAD_LAST_SUCCESS = "farm_reload_last_success"
BUILD = "farm_build"  # info
WORKER_RSS = "farm_worker_resident_memory_bytes"  # gauge {worker}
WORKER_CPU = "farm_worker_cpu_seconds"  # counter {worker}
WORKER_FDS = "farm_worker_open_fds"  # gauge {worker}
WORKER_THREADS = "farm_worker_threads"  # gauge {worker}
LISTENER_QUEUE = "farm_listener_accept_queue"  # gauge {listener}
LISTENER_QUEUE_LIMIT = "farm_listener_accept_queue_limit"  # gauge {listener}
SCRAPE_ERRORS = "farm_scrape_errors"  # counter {worker}

SIZE_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 33554432)
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DNS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: What the checks do about a message (``farm_authentication_actions_total``).
AUTHENTICATION_ACTION_NAMES = (
    "spf_reject",
    "dmarc_reject",
    "dmarc_quarantine",
    "dmarc_sampled_out",
)

#: The classes of replies counted (``farm_replies_total``).
REPLY_CLASSES = ("2xx", "3xx", "4xx", "5xx")

#: How sessions end.
ENDED_HOW = ("quit", "disconnect", "timeout", "shutdown", "error")


@dataclass(slots=True)
class Histogram:
    """Bucket counts and a sum, cumulative only when exported."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else _bound(bound), running))
        return out


def _bound(value: float) -> str:
    return str(int(value)) if value == int(value) and value >= 1 else repr(value)


class WorkerStats:
    """A worker's counters: plain integers, updated by the engine, read at scrape time."""

    def __init__(self) -> None:
        self.connections = 0
        self.active = 0
        self.draining = 0
        self.limit = 0
        self.loop_lag = 0.0
        self.ended = dict.fromkeys(ENDED_HOW, 0)
        self.commands: dict[str, int] = {}
        #: Replies sent (see :attr:`replies`): by class (:meth:`reply`), by first digit
        #: (:meth:`reply_text`; the engine counts into ``reply_digits`` inline, per reply).
        self._replies = dict.fromkeys(REPLY_CLASSES, 0)
        self.reply_digits = dict.fromkeys("2345", 0)
        self.messages = {"accepted": 0, "rejected": 0}
        self.received_bytes = 0
        self.sizes = Histogram(SIZE_BUCKETS)
        self.banner = Histogram(DURATION_BUCKETS)
        self.handlers: dict[str, Histogram] = {}
        self.tls = {"ok": 0, "failed": 0}
        self.auth = {"success": 0, "failure": 0}
        self.limited = {"sessions": 0, "messages": 0, "auth": 0}
        #: Clients refused with 554 5.5.0: ``early_talker`` (``greeting_delay``), ``pipelining``
        #: (``forbid_unauth_pipelining``).
        self.violations = {"early_talker": 0, "pipelining": 0}
        #: Screening ([screening]): lookups by (list, listed/unlisted/error), verdicts, cache.
        self.screening: dict[tuple[str, str], int] = {}
        self.screening_verdicts = {"pass": 0, "listed": 0, "exempt": 0}
        self.screening_cache = {"hit": 0, "miss": 0}
        #: Sender authentication ([authentication]): results by (method, result), actions.
        self.authentication: dict[tuple[str, str], int] = {}
        self.authentication_actions = dict.fromkeys(AUTHENTICATION_ACTION_NAMES, 0)
        self.dns: dict[str, Histogram] = {}
        self.scan_results: dict[tuple[str, str], int] = {}
        self.scan_durations: dict[str, Histogram] = {}

    def command(self, verb: str) -> None:
        commands = self.commands
        try:
            commands[verb] += 1
        except KeyError:
            if len(commands) < 64:  # unknown verbs are counted as one label, not one each
                commands[verb] = 1

    def reply(self, code_class: str) -> None:
        """Count a reply of class ``code_class`` (``2xx`` to ``5xx``; anything else is not)."""
        replies = self._replies
        if code_class in replies:
            replies[code_class] += 1

    def reply_text(self, text: str) -> None:
        """Count a reply by its text (the engine's call, per reply: no class string made)."""
        try:  # noqa: SIM105 (per reply: no context manager)
            self.reply_digits[text[:1]] += 1
        except KeyError:
            pass  # not a reply (a handler's malformed one): not counted

    @property
    def replies(self) -> dict[str, int]:
        """Replies sent, by class: ``{"2xx": n, "3xx": n, "4xx": n, "5xx": n}``."""
        digits = self.reply_digits
        return {cls: n + digits[cls[0]] for cls, n in self._replies.items()}

    def handler_time(self, hook: str, seconds: float) -> None:
        histogram = self.handlers.get(hook)
        if histogram is None:
            histogram = self.handlers[hook] = Histogram(DURATION_BUCKETS)
        histogram.observe(seconds)

    def count(self, table: dict[tuple[str, str], int], key: tuple[str, str]) -> None:
        """Count into a two-label table (bounded: at most 256 label pairs)."""
        if key in table:
            table[key] += 1
        elif len(table) < 256:
            table[key] = 1

    def dns_time(self, check: str, seconds: float) -> None:
        histogram = self.dns.get(check)
        if histogram is None:
            histogram = self.dns[check] = Histogram(DNS_BUCKETS)
        histogram.observe(seconds)

    def scan_result(self, scanner: str, action: str, seconds: float | None = None) -> None:
        """One scanner's verdict on one message, and the time it took (if it was asked)."""
        key = (scanner, action)
        self.scan_results[key] = self.scan_results.get(key, 0) + 1
        if seconds is not None:
            histogram = self.scan_durations.get(scanner)
            if histogram is None:
                histogram = self.scan_durations[scanner] = Histogram(DURATION_BUCKETS)
            histogram.observe(seconds)

    def families(self) -> Iterator[Metric]:
        """The counters as metric families (help texts included)."""
        yield _counter(CONNECTIONS, "Connections accepted.", [((), self.connections)])
        yield _gauge(SESSIONS_ACTIVE, "Sessions open now.", [((), self.active)])
        yield _gauge(SESSIONS_DRAINING, "Sessions told to finish (drain).", [((), self.draining)])
        yield _gauge(
            SESSIONS_LIMIT, "Sessions at which the worker stops accepting.", [((), self.limit)]
        )
        yield _gauge(LOOP_LAG, "Event-loop lag at the last heartbeat.", [((), self.loop_lag)])
        yield _counter(
            SESSIONS_ENDED,
            "Sessions by how they ended.",
            [((how,), n) for how, n in self.ended.items()],
            ("how",),
        )
        yield _counter(
            COMMANDS,
            "Commands received, by verb.",
            [((verb,), n) for verb, n in sorted(self.commands.items())],
            ("verb",),
        )
        yield _counter(
            REPLIES,
            "Replies sent, by class.",
            [((cls,), n) for cls, n in self.replies.items()],
            ("class",),
        )
        yield _counter(
            MESSAGES,
            "Messages by outcome (accepted: a 2xx after DATA/BDAT LAST).",
            [((outcome,), n) for outcome, n in self.messages.items()],
            ("outcome",),
        )
        yield _counter(RECEIVED_BYTES, "Message octets received.", [((), self.received_bytes)])
        yield _histogram(MESSAGE_SIZE, "Size of received messages.", [((), self.sizes)])
        yield _histogram(
            HANDLER_DURATION,
            "Time the handler took, by hook.",
            [((hook,), h) for hook, h in sorted(self.handlers.items())],
            ("hook",),
        )
        yield _histogram(BANNER_DELAY, "Time from accept to the 220 greeting.", [((), self.banner)])
        yield _counter(
            TLS_HANDSHAKES,
            "STARTTLS handshakes, by result.",
            [((r,), n) for r, n in self.tls.items()],
            ("result",),
        )
        yield _counter(
            AUTH_ATTEMPTS,
            "AUTH credential checks, by result.",
            [((r,), n) for r, n in self.auth.items()],
            ("result",),
        )
        yield _counter(
            CLIENT_LIMITED,
            "Refusals by a per-client-IP limit (sessions, messages, auth).",
            [((limit,), n) for limit, n in self.limited.items()],
            ("limit",),
        )
        yield _counter(
            PROTOCOL_VIOLATIONS,
            "Clients refused for not waiting (early_talker: before the greeting; pipelining: "
            "before a reply).",
            [((kind,), n) for kind, n in self.violations.items()],
            ("kind",),
        )
        yield _counter(
            SCREENING_RESULTS,
            "DNS list lookups of client addresses, by list and result (listed, unlisted, error).",
            [(key, n) for key, n in sorted(self.screening.items())],
            ("list", "result"),
        )
        yield _counter(
            SCREENING_VERDICTS,
            "Screened clients by verdict (listed: score at or above the threshold).",
            [((verdict,), n) for verdict, n in self.screening_verdicts.items()],
            ("verdict",),
        )
        yield _counter(
            SCREENING_CACHE,
            "Screening verdicts found in (hit) or missing from (miss) the farm-wide cache.",
            [((result,), n) for result, n in self.screening_cache.items()],
            ("result",),
        )
        yield _counter(
            AUTHENTICATION_RESULTS,
            "Sender authentication results (spf, dkim per signature, arc, dmarc).",
            [(key, n) for key, n in sorted(self.authentication.items())],
            ("method", "result"),
        )
        yield _counter(
            AUTHENTICATION_ACTIONS,
            "Messages refused or marked by the authentication checks, by action.",
            [((action,), n) for action, n in self.authentication_actions.items()],
            ("action",),
        )
        yield _histogram(
            DNS_LOOKUP_DURATION,
            "DNS lookup time, by check (screening, spf, dkim, dmarc).",
            [((check,), h) for check, h in sorted(self.dns.items())],
            ("check",),
        )
        yield _counter(
            SCAN_RESULTS,
            "Content scanners' verdicts ([scan]), by scanner and action.",
            [(key, n) for key, n in sorted(self.scan_results.items())],
            ("scanner", "action"),
        )
        yield _histogram(
            SCAN_DURATION,
            "Time each content scanner took per message.",
            [((name,), h) for name, h in sorted(self.scan_durations.items())],
            ("scanner",),
        )


def _counter(
    name: str, doc: str, samples: list[tuple[tuple[str, ...], float]], labels: tuple = ()
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def _gauge(
    name: str, doc: str, samples: list[tuple[tuple[str, ...], float]], labels: tuple = ()
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def _histogram(
    name: str, doc: str, samples: list[tuple[tuple[str, ...], Histogram]], labels: tuple = ()
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    for values, histogram in samples:
        family.add_metric(list(values), histogram.cumulative(), histogram.total)
    return family


class StatsCollector:
    """Exposes a :class:`WorkerStats` through a prometheus_client registry."""

    def __init__(self, stats: WorkerStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        return self.stats.families()


class SupervisorMetrics:
    """The supervisor's own metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.workers_desired = Gauge(
            WORKERS_DESIRED, "Workers the supervisor keeps running.", registry=self.registry
        )
        self.workers_ready = Gauge(
            WORKERS_READY,
            "Workers of the serving generation that reported READY and are alive.",
            registry=self.registry,
        )
        self.restarts = Counter(
            WORKER_RESTARTS,
            "Workers replaced, by reason (crash, timeout, recycle, reload).",
            ["reason"],
            registry=self.registry,
        )
        self.reload_generation = Gauge(
            RELOAD_GENERATION,
            "Generation of the workers serving now (1 at start, +1 per successful reload).",
            registry=self.registry,
        )
        self.reload_last_timestamp = Gauge(
            RELOAD_LAST_TIMESTAMP, "Unix time of the last reload attempt.", registry=self.registry
        )
        self.reload_last_success = Gauge(
            RELOAD_LAST_SUCCESS,
            "1 if the last reload attempt succeeded, 0 if it failed.",
            registry=self.registry,
        )
        self.backoff = Gauge(
            WORKER_BACKOFF,
            "Delay before a crashed worker slot is respawned (0 when not throttled).",
            ["worker"],
            registry=self.registry,
        )
        self.scrape_errors = Counter(
            SCRAPE_ERRORS,
            "Scrapes for which a worker did not answer in time.",
            ["worker"],
            registry=self.registry,
        )
        self.build = Info(BUILD, "Version of farm.", registry=self.registry)
        for reason in ("crash", "timeout", "recycle", "reload"):
            self.restarts.labels(reason)
