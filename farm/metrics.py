"""Every metric name the farm exports, defined once (invariant 7)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info


class SupervisorMetrics:
    """The supervisor's own metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.workers_desired = Gauge(
            "farm_workers_desired", "Workers the supervisor keeps running.", registry=self.registry
        )
        self.workers_ready = Gauge(
            "farm_workers_ready",
            "Workers of the serving generation that reported READY and are alive.",
            registry=self.registry,
        )
        self.restarts = Counter(
            "farm_worker_restarts",
            "Workers replaced, by reason (crash, timeout, recycle, reload).",
            ["reason"],
            registry=self.registry,
        )
        self.reload_generation = Gauge(
            "farm_reload_generation",
            "Generation of the workers serving now (1 at start, +1 per successful reload).",
            registry=self.registry,
        )
        self.reload_last_timestamp = Gauge(
            "farm_reload_last_timestamp_seconds",
            "Unix time of the last reload attempt.",
            registry=self.registry,
        )
        self.reload_last_success = Gauge(
            "farm_reload_last_success",
            "1 if the last reload attempt succeeded, 0 if it failed.",
            registry=self.registry,
        )
        self.backoff = Gauge(
            "farm_worker_backoff_seconds",
            "Delay before a crashed worker slot is respawned (0 when not throttled).",
            ["worker"],
            registry=self.registry,
        )
        self.build = Info("farm_build", "Version of farm.", registry=self.registry)
        for reason in ("crash", "timeout", "recycle", "reload"):
            self.restarts.labels(reason)
