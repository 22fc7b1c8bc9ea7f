"""Sinks: where normalised events go. Files implement the synchronous interface in base.py; buses
implement the client contract in bus.py and are fed by a Delivery (its buffer, task and spool)."""

from __future__ import annotations

import importlib

from feedrunner.metrics import Metrics
from feedrunner.sinks.base import Sink
from feedrunner.sinks.bus import BusSink
from feedrunner.sinks.delivery import Delivery
from feedrunner.spec import Sink as SinkSpec

_CLASSES = {
    "jsonl": "feedrunner.sinks.jsonl:JsonlSink",
    "stdout": "feedrunner.sinks.stdout:StdoutSink",
    "parquet": "feedrunner.sinks.parquet:ParquetSink",
    "kafka": "feedrunner.sinks.kafka:KafkaSink",
    "nats": "feedrunner.sinks.nats:NatsSink",
    "redis": "feedrunner.sinks.redis:RedisSink",
}


def build(spec: SinkSpec, metrics: Metrics) -> Sink | Delivery:
    module, _, name = _CLASSES[spec.type].partition(":")
    cls = getattr(importlib.import_module(module), name)
    sink = cls(spec)
    return Delivery(sink, metrics) if isinstance(sink, BusSink) else sink
