"""Sinks: where normalised events go. Each implements the small interface in base.py."""

from __future__ import annotations

from feedrunner.sinks.base import Sink
from feedrunner.spec import Sink as SinkSpec


def build(spec: SinkSpec) -> Sink:
    if spec.type == "jsonl":
        from feedrunner.sinks.jsonl import JsonlSink

        return JsonlSink(spec)
    from feedrunner.sinks.stdout import StdoutSink

    return StdoutSink(spec)
