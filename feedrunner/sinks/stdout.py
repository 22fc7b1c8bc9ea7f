"""One JSON object a line on standard output: for pipes and demos."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from feedrunner.events import Event
from feedrunner.sinks.base import Sink, encode_lines
from feedrunner.spec import Sink as SinkSpec


class StdoutSink(Sink):
    def __init__(self, spec: SinkSpec) -> None:
        super().__init__(spec)
        self._pending = 0  # events buffered since the last flush, counted as lost if it fails

    def write(self, events: Sequence[Event]) -> int:
        try:
            sys.stdout.write(encode_lines(events).decode())  # text: shares sys.stdout's buffer with anything else
        except Exception as exc:  # a closed or broken pipe
            self.state.fail("stdout", "write", len(events), exc)
            return 0
        self._pending += len(events)
        return len(events)

    def flush(self) -> None:
        pending, self._pending = self._pending, 0
        try:
            sys.stdout.flush()
        except Exception as exc:
            self.state.fail("stdout", "flush", pending, exc)
            return
        if pending:
            self.state.ok("stdout")
