"""One JSON object a line on standard output: for pipes and demos."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from feedrunner.events import Event
from feedrunner.sinks.base import Sink, encode_lines


class StdoutSink(Sink):
    def write(self, events: Sequence[Event]) -> int:
        sys.stdout.write(encode_lines(events).decode())  # text: shares sys.stdout's buffer with anything else
        return len(events)

    def flush(self) -> None:
        sys.stdout.flush()
