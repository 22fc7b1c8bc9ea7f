"""Sink settings in feeds.yaml: each mistake a clear error at its line and key path, secrets kept secret."""

from __future__ import annotations

import textwrap

from feedrunner.spec import Secret, check_text

HEAD = """\
version: 1
venues:
  ib: {adapter: ib, symbols: [AAPL]}
sinks:
"""


def _check(sinks: str, env: dict[str, str] | None = None):
    return check_text(HEAD + textwrap.indent(textwrap.dedent(sinks), "  "), "feeds.yaml", env or {})


def _problems(sinks: str, env: dict[str, str] | None = None) -> list[str]:
    spec, found = _check(sinks, env)
    assert spec is None
    return [str(p) for p in found]


def test_an_unknown_sink_type_is_refused_with_the_choices():
    (p,) = _problems("- {type: kinesis}\n")
    assert p.startswith("feeds.yaml:5:") and "sinks[0].type" in p and "kafka" in p and "redis" in p


def test_a_bus_without_its_address_is_refused():
    found = _problems("- {type: kafka, topic: md}\n- {type: nats}\n- {type: redis}\n")
    assert any("sinks[0]" in p and "brokers" in p for p in found)
    assert any("sinks[1]" in p and "servers" in p for p in found)
    assert any("sinks[2]" in p and "url" in p for p in found)


def test_a_template_naming_an_unknown_field_is_refused_at_its_key():
    found = _problems(
        """\
        - {type: kafka, brokers: [k:9092], topic: "md.{venue}.{exchange}"}
        - {type: nats, servers: [nats://n:4222], subject: "md.{date}"}
        - {type: redis, url: redis://r:6379/0, stream: "md:{sym}"}
        - {type: parquet, path: "p/{symbol}"}
        """
    )
    assert any("sinks[0].topic" in p and "{exchange}" in p for p in found)
    assert any("sinks[1].subject" in p and "{date}" in p for p in found)
    assert any("sinks[2].stream" in p and "{sym}" in p for p in found)
    assert any("sinks[3].path" in p and "{symbol}" in p for p in found)
    assert len(found) == 4


def test_a_setting_of_another_sink_type_is_named_as_such():
    (p,) = _problems("- {type: redis, url: redis://r:6379/0, subject: md}\n")
    assert "sinks[0].subject" in p and "not a setting of redis sinks" in p


def test_two_sinks_of_one_name_and_inconsistent_bounds_are_refused():
    found = _problems(
        """\
        - {type: redis, url: redis://r:6379/0}
        - {type: redis, url: redis://s:6379/0, batch: 10, buffer: 5, spool: {max_bytes: 1MiB, segment_bytes: 2MiB}}
        """
    )
    assert any("sinks[1].type" in p and "'redis'" in p for p in found)
    assert any("sinks[1].batch" in p for p in found)
    assert any("sinks[1].spool.segment_bytes" in p for p in found)


def test_bus_settings_are_typed_and_credentials_from_the_environment_are_secrets():
    spec, found = _check(
        """\
        - type: kafka
          name: desk
          brokers: ["${BROKERS}"]
          security_protocol: sasl_ssl
          sasl_mechanism: SCRAM-SHA-512
          username: "${USER_}"
          password: "${PASS}"
          linger: 10ms
          batch_bytes: 2MiB
          spool: {max_bytes: 10MiB, fsync: always, overflow: drop_newest}
        """,
        {"BROKERS": "k1:9092", "USER_": "desk", "PASS": "hunter22"},
    )
    assert spec is not None, found
    sink = spec.sinks[0]
    assert sink.label == "desk" and sink.kafka is not None and sink.delivery is not None
    assert sink.kafka.brokers == ("k1:9092",) and sink.kafka.linger == 0.01 and sink.kafka.batch_bytes == 2 << 20
    assert isinstance(sink.kafka.password, Secret) and "hunter22" not in repr(sink)
    spool = sink.delivery.spool
    assert spool.max_bytes == 10 << 20 and spool.fsync == "always" and spool.overflow == "drop_newest"
    assert spool.path.endswith("spool/desk")  # beside the default SQLite state file


def test_sasl_without_credentials_is_refused():
    (p,) = _problems("- {type: kafka, brokers: [k:9092], security_protocol: sasl_plaintext}\n")
    assert "sinks[0].security_protocol" in p and "username" in p
