"""One JSON object a line on standard output: for pipes and demos."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from feedrunner.events import Event
from feedrunner.sinks.base import Sink, dumps


class StdoutSink(Sink):
    def write(self, events: Sequence[Event]) -> int:
        sys.stdout.write("".join(dumps(e) + "\n" for e in events))
        return len(events)

    def flush(self) -> None:
        sys.stdout.flush()
