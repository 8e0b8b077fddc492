"""A worker's counters (farm.metrics.WorkerStats): the engine's fast calls count what the
by-class calls count, and the scrape exports both alike."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from farm.metrics import StatsCollector, WorkerStats


def exported(stats: WorkerStats) -> str:
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))
    return generate_latest(registry).decode()


def test_replies_counted_by_text_or_by_class_export_the_same() -> None:
    texts = ["220 ready", "250 ok", "354 go on", "421 busy", "550 no", "250-multi", "", "x"]
    by_text, by_class = WorkerStats(), WorkerStats()
    for text in texts:
        by_text.reply_text(text)
        by_class.reply(text[:1] + "xx")
    assert by_text.replies == by_class.replies == {"2xx": 3, "3xx": 1, "4xx": 1, "5xx": 1}
    assert exported(by_text) == exported(by_class)
    assert 'farm_replies_total{class="2xx"} 3.0' in exported(by_text)


def test_commands_and_histograms() -> None:
    stats = WorkerStats()
    for verb in ["EHLO", "MAIL", "MAIL", *(f"X{n}" for n in range(100))]:
        stats.command(verb)
    assert stats.commands["MAIL"] == 2
    assert len(stats.commands) == 64  # unknown verbs stop adding labels
    stats.banner.observe(0.0004)
    stats.banner.observe(7.0)
    assert stats.banner.cumulative()[0] == ("0.001", 1)
    assert stats.banner.cumulative()[-1] == ("+Inf", 2)
    assert stats.banner.total == 7.0004
