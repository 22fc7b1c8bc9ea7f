"""Health windows on a fake clock: a window with less data than it asks is inconclusive, and memory
growth is measured over its window from the baseline taken once the venues are up."""

from __future__ import annotations

from types import SimpleNamespace

from helpers import Clock

from feedrunner.health import Health
from feedrunner.spec import Condition


class Rss:
    """Stands in for psutil.Process: the RSS the test sets."""

    def __init__(self, rss: int) -> None:
        self.rss = rss

    def memory_info(self) -> SimpleNamespace:
        return SimpleNamespace(rss=self.rss)


MB = 2**20


def make(rss: int) -> tuple[Health, Clock, Rss]:
    clock, proc = Clock(), Rss(rss)
    health = Health([3600.0], clock=clock)
    health.process = proc  # type: ignore[assignment]
    return health, clock, proc


def cond(metric: str, window: float, threshold: float = 1.0) -> Condition:
    return Condition(metric, "above", threshold, window, 1, f"{metric} above")


def test_startup_allocation_is_not_growth():
    health, clock, proc = make(50 * MB)
    proc.rss = 160 * MB  # markets loaded: the runner's start, before the venues are up
    assert health.memory_growth(3600).value is None
    health.mark_up()
    for _ in range(10):
        clock.now += 1
        health.sample_memory()
    assert health.memory()[1] == 0.0
    reading = health.evaluate(cond("memory_growth", 3600), [], [], None)
    assert reading.value is None and reading.covered < 3600  # 10 s of an hour: inconclusive


def test_growth_over_a_full_window_is_measured_from_the_window_start():
    health, clock, proc = make(100 * MB)
    health.mark_up()
    for _ in range(7200):  # two hours, 10 MB more each hour
        clock.now += 1
        proc.rss += int(10 * MB / 3600)
        health.sample_memory()
    reading = health.evaluate(cond("memory_growth", 3600), [], [], None)
    assert reading.value is not None
    assert 9.5 * MB < reading.value < 10.5 * MB  # the last hour's growth, not the two since start
    assert health.memory()[1] > 19 * MB
    assert len(health.rss_samples) <= health.keep + 1  # bounded by the longest window


def test_a_window_longer_than_the_data_is_inconclusive_for_every_windowed_metric():
    health, clock, _ = make(10 * MB)
    health.mark_up()
    for _ in range(15):
        clock.now += 1
        health.sample_up("v", True)
        health.error("v")
    for metric in ("error_rate", "uptime", "reconnects_per_hour", "latency_avg"):
        assert health.evaluate(cond(metric, 3600), ["v"], [("v", "S")], None).value is None, metric
    assert health.evaluate(cond("error_rate", 10), ["v"], [("v", "S")], None).value == 1.0
    assert health.evaluate(cond("staleness", 3600), ["v"], [("v", "S")], None).value is not None


def test_nothing_counts_before_the_venues_are_up():
    health, clock, _ = make(10 * MB)
    clock.now += 7200
    health.sample_up("v", True)
    assert health.evaluate(cond("uptime", 60), ["v"], [("v", "S")], None).value is None
