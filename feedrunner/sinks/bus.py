"""The contract a bus client implements: open, send a batch until the bus acknowledges all of it, close.

The delivery loop (sinks/delivery.py) owns everything else: the sink's buffer and task, the spool,
retries, metrics and state. A client only says what happened, by raising: `Transient` when trying again
later may work (broker down, timeout, leader moving), `Permanent` when it cannot without an operator
(authentication refused, a topic or stream that does not exist, a message the bus refuses as too large).
A send may have delivered part of its batch before it failed: the batch is sent again whole, and every
message carries its event id (events.event_id) so a consumer or the bus de-duplicates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from feedrunner.events import Event
from feedrunner.spec import Sink as SinkSpec


class DeliveryError(Exception):
    permanent = False


class Transient(DeliveryError):
    """The bus did not take the batch this time; retried with backoff from the spool."""


class Permanent(DeliveryError):
    """The bus refuses the batch for a reason only an operator can fix: alerted, retried slowly."""

    permanent = True


class BusSink(ABC):
    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.name = spec.label
        self.kinds = frozenset(spec.kinds)

    @abstractmethod
    async def open(self) -> None:
        """Connect and check the destination (stream exists, topic known). Raises Transient or Permanent;
        called again before the next send after any failure."""

    @abstractmethod
    async def send(self, events: Sequence[Event]) -> None:
        """Return once the bus has acknowledged every event of the batch, in order per symbol; raise
        Transient or Permanent otherwise. Bounded by the caller's timeout (spec.delivery.timeout)."""

    @abstractmethod
    async def close(self) -> None:
        """Let go of connections; must not raise and must not hang (the caller bounds it too)."""

    def where(self) -> str:
        """Where it delivers, for logs and status: servers and templates, never credentials."""
        return self.spec.type


def render(template: str, e: Event, symbol: str | None = None) -> str:
    """A topic, key, subject or stream name for one event; `symbol` overrides the event's own (made
    safe for the bus by the caller). Templates were checked at load to name only venue, kind, symbol."""
    return template.format(venue=e.venue, kind=e.kind, symbol=e.symbol if symbol is None else symbol)
