"""The sink interface: write batches, flush on a timer and at shutdown, close."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import orjson

from feedrunner.events import Event, to_dict
from feedrunner.spec import Sink as SinkSpec


class Sink(ABC):
    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.kinds = frozenset(spec.kinds)
        self.name = spec.type + (f":{spec.path}" if spec.path else "")

    @abstractmethod
    def write(self, events: Sequence[Event]) -> int:
        """Write a batch (already filtered by kind); return how many were written."""

    def flush(self) -> None:  # noqa: B027 - optional
        pass

    def close(self) -> None:
        self.flush()


def dumps(event: Event) -> str:
    """orjson: about five times faster than the json module, and ccxt already depends on it."""
    return orjson.dumps(to_dict(event)).decode()
