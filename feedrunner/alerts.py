"""Alerts: one per condition while it lasts, a resolution when it clears; to the log and a webhook.

Webhook delivery runs in the background from a bounded queue, with retries and capped backoff; an alert
that cannot be delivered is counted and logged, never retried forever, and never blocks the feeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp
from loguru import logger
from prometheus_client import CollectorRegistry, Counter

from feedrunner.spec import Webhook

QUEUE = 256


class Alerts:
    def __init__(self, webhook: Webhook | None, registry: CollectorRegistry) -> None:
        self.webhook = webhook
        self.active: dict[str, dict[str, Any]] = {}
        self.sent = Counter("feedrunner_alerts_total", "Alerts raised and resolved.", ["status"], registry=registry)
        self.failed = Counter(
            "feedrunner_alert_deliveries_failed_total", "Webhook deliveries given up.", registry=registry
        )
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=QUEUE)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.webhook is not None:
            self._task = asyncio.create_task(self._deliver(), name="alerts")

    async def stop(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout=3)  # give pending alerts a moment
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def update(self, key: str, firing: bool, detail: dict[str, Any]) -> None:
        """Raise `key` once when it starts firing; resolve it once when it stops."""
        if firing and key not in self.active:
            self.active[key] = {**detail, "since": time.time()}
            logger.warning("ALERT {}: {}", key, detail.get("summary", ""))
            self._emit("firing", key, detail)
        elif not firing and key in self.active:
            since = self.active.pop(key)["since"]
            logger.info("RESOLVED {} after {:.0f}s", key, time.time() - since)
            self._emit("resolved", key, {**detail, "duration_seconds": round(time.time() - since, 1)})

    def _emit(self, status: str, key: str, detail: dict[str, Any]) -> None:
        self.sent.labels(status).inc()
        if self.webhook is None:
            return
        payload = {"status": status, "alert": key, "at": time.time(), **detail}
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.failed.inc()
            logger.error("alert queue full ({}): dropped {} {}", QUEUE, status, key)

    async def _deliver(self) -> None:
        assert self.webhook is not None
        url, timeout = self.webhook.url.reveal(), aiohttp.ClientTimeout(total=self.webhook.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                payload = await self._queue.get()
                try:
                    for attempt in range(1, self.webhook.max_attempts + 1):
                        try:
                            async with session.post(url, json=payload) as resp:
                                if resp.status < 300:
                                    break
                                problem = f"HTTP {resp.status}"
                        except (aiohttp.ClientError, TimeoutError) as exc:
                            problem = type(exc).__name__
                        if attempt == self.webhook.max_attempts:
                            self.failed.inc()
                            logger.error(
                                "alert webhook gave up after {} attempts ({}): {} {}",
                                attempt,
                                problem,
                                payload["status"],
                                payload["alert"],
                            )
                        else:
                            await asyncio.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)))
                finally:
                    self._queue.task_done()
