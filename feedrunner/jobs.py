"""Scheduler job entry points, referenced by name ("feedrunner.jobs:rollout_job") so APScheduler's
persistent job store can hold them across restarts. They act on the runner bound in this process."""

from __future__ import annotations

from typing import Any

_runner: Any = None


def bind(runner: Any) -> None:
    global _runner
    _runner = runner


async def health_job() -> None:
    if _runner is not None:
        _runner.health_tick()


async def rollout_job() -> None:
    if _runner is not None:
        _runner.rollout_tick()
