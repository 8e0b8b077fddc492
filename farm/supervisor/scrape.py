"""Merging the workers' metrics: a ``worker`` label per slot, totals that never go backwards.

Each worker process reports its own counters (from zero). The supervisor keeps, per slot, the
last totals of every process that held the slot and exited; a slot's value is those retired
totals plus what its live processes report. Gauges are summed over the slot's live processes.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from farm import metrics

log = logging.getLogger("farm.supervisor")

#: Metric types whose samples only grow: retired processes' values carry over.
_CUMULATIVE = {"counter", "histogram", "summary"}

SampleKey = tuple[str, str, tuple[tuple[str, str], ...]]  # family, sample name, labels


@dataclass
class _Family:
    documentation: str
    type: str


@dataclass
class _Process:
    slot: int
    samples: dict[SampleKey, float] = field(default_factory=dict)
    cpu_seconds: float = 0.0


class WorkerMetrics:
    """The supervisor's view of every worker's metrics, merged by slot."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        self._processes: dict[int, _Process] = {}
        self._retired: dict[int, collections.Counter[SampleKey]] = collections.defaultdict(
            collections.Counter
        )
        self._retired_cpu: collections.Counter[int] = collections.Counter()

    def record(self, pid: int, slot: int, text: str) -> None:
        """Store a worker's latest exposition text."""
        samples: dict[SampleKey, float] = {}
        try:
            for family in text_string_to_metric_families(text):
                self._families.setdefault(family.name, _Family(family.documentation, family.type))
                for sample in family.samples:
                    labels = dict(sample.labels, worker=str(slot))
                    key = (family.name, sample.name, tuple(sorted(labels.items())))
                    samples[key] = sample.value
        except ValueError as error:
            log.warning("worker %d (pid %d): unreadable metrics: %s", slot, pid, error)
            return
        process = self._processes.setdefault(pid, _Process(slot))
        process.samples = samples

    def exited(self, pid: int) -> None:
        """A worker process is gone: its last totals become its slot's retired totals."""
        process = self._processes.pop(pid, None)
        if process is None:
            return
        retired = self._retired[process.slot]
        for key, value in process.samples.items():
            if self._families[key[0]].type in _CUMULATIVE:
                retired[key] += value
        self._retired_cpu[process.slot] += process.cpu_seconds

    def families(self, live: dict[int, int]) -> Iterator[Metric]:
        """Merged worker families; ``live`` maps each live worker pid to its slot."""
        values: collections.Counter[SampleKey] = collections.Counter()
        for retired in self._retired.values():
            values.update(retired)
        for pid, process in self._processes.items():
            if pid in live:
                values.update(process.samples)
        by_family: dict[str, list[tuple[str, dict[str, str], float]]] = collections.defaultdict(
            list
        )
        for (family, sample, labels), value in values.items():  # the workers' own order
            by_family[family].append((sample, dict(labels), value))
        for name, samples in by_family.items():
            meta = self._families[name]
            metric = Metric(name, meta.documentation, meta.type)
            for sample, labels, value in samples:
                metric.add_sample(sample, labels, value)
            yield metric
        yield from self._process_families(live)

    def _process_families(self, live: dict[int, int]) -> Iterator[Metric]:
        rss = GaugeMetricFamily(metrics.WORKER_RSS, "Resident memory.", labels=["worker"])
        cpu = CounterMetricFamily(
            metrics.WORKER_CPU, "CPU time (user+system) of the slot.", labels=["worker"]
        )
        fds = GaugeMetricFamily(metrics.WORKER_FDS, "Open file descriptors.", labels=["worker"])
        threads = GaugeMetricFamily(metrics.WORKER_THREADS, "Threads.", labels=["worker"])
        cpu_by_slot = collections.Counter(self._retired_cpu)
        memory: collections.Counter[int] = collections.Counter()
        descriptors: collections.Counter[int] = collections.Counter()
        thread_count: collections.Counter[int] = collections.Counter()
        for pid, slot in live.items():
            try:
                info = psutil.Process(pid)
                with info.oneshot():
                    times = info.cpu_times()
                    seconds = times.user + times.system
                    memory[slot] += info.memory_info().rss
                    descriptors[slot] += info.num_fds()
                    thread_count[slot] += info.num_threads()
            except psutil.Error:
                continue
            process = self._processes.setdefault(pid, _Process(slot))
            process.cpu_seconds = seconds
            cpu_by_slot[slot] += seconds
        for slot in sorted(set(cpu_by_slot) | set(memory)):
            cpu.add_metric([str(slot)], cpu_by_slot[slot])
        for slot in sorted(memory):
            rss.add_metric([str(slot)], memory[slot])
            fds.add_metric([str(slot)], descriptors[slot])
            threads.add_metric([str(slot)], thread_count[slot])
        yield from (rss, cpu, fds, threads)


def listener_families(listeners: Iterable[tuple[str, object]]) -> Iterator[Metric]:
    """Accept-queue depth and limit of each TCP listener (Linux ``TCP_INFO``)."""
    from farm.supervisor.listeners import accept_queue

    depth = GaugeMetricFamily(
        metrics.LISTENER_QUEUE, "Connections waiting to be accepted.", labels=["listener"]
    )
    limit = GaugeMetricFamily(
        metrics.LISTENER_QUEUE_LIMIT, "The listen backlog.", labels=["listener"]
    )
    for name, sock in listeners:
        queue = accept_queue(sock)  # type: ignore[arg-type]
        if queue is not None:
            depth.add_metric([name], queue.length)
            limit.add_metric([name], queue.limit)
    yield depth
    yield limit
