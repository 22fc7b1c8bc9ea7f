"""`feedrunner validate | schema | --version`: exit codes, output formats, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from feedrunner import __version__
from feedrunner.cli import EX_CONFIG, EX_OK, EX_USAGE, main

ROOT = Path(__file__).resolve().parents[1]
VALID = "version: 1\nvenues:\n  binance: {adapter: ccxt, exchange: binance, symbols: [BTC/USDT]}\n"


def test_validate_valid_file_prints_the_plan(tmp_path, capsys):
    f = tmp_path / "feeds.yaml"
    f.write_text(VALID)
    assert main(["validate", str(f)]) == EX_OK
    out = capsys.readouterr().out
    assert "valid" in out and "venue binance: ccxt binance, 1 symbols" in out


def test_validate_invalid_exits_78_with_located_lines(tmp_path, capsys):
    f = tmp_path / "feeds.yaml"
    f.write_text(VALID + "defaults:\n  backoff: {base: 2s, cap: 1s}\n")
    assert main(["validate", str(f)]) == EX_CONFIG
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{f}:5:23: defaults.backoff.cap: cap (1s) must be >= base (2s)"]


def test_validate_several_files_worst_wins(tmp_path, capsys):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(VALID)
    bad.write_text("version: 1\n")
    assert main(["validate", "-q", str(good), str(bad)]) == EX_CONFIG
    assert f"{bad}:1:1: missing required key 'venues'" in capsys.readouterr().out


def test_validate_json_format(tmp_path, capsys):
    f = tmp_path / "feeds.yaml"
    f.write_text("version: 1\nvenues: {}\n")
    assert main(["validate", "--format", "json", str(f)]) == EX_CONFIG
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] is False
    assert report["problems"] == [
        {"file": str(f), "line": 2, "column": 1, "path": "venues", "message": "needs at least 1 entry"}
    ]


def test_schema_and_version(capsys):
    assert main(["schema"]) == EX_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed["$id"].endswith("feeds.schema.json")
    assert main(["--version"]) == EX_OK
    assert capsys.readouterr().out.strip() == f"feedrunner {__version__}"


def test_usage_error_is_64(capsys):
    assert main(["frobnicate"]) == EX_USAGE
    assert main([]) == EX_USAGE


def test_run_dry_run_prints_the_plan(capsys):
    assert main(["run", "--dry-run", str(ROOT / "feeds.yaml")]) == EX_OK
    out = capsys.readouterr().out
    assert "rollout: polling -> websocket, 4 phases" in out and "canary: 1 symbols, dwell 1d" in out


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        ("dir", "not a regular file (it is a directory)"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "not UTF-8 text"),
        ("version: 1\nvenues: [\n", "YAML syntax error"),
        (
            "a: &a [1,1,1,1,1,1,1,1,1,1]\n"
            + "".join(f"{c}: &{c} [{','.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True)),
            "alias bomb",
        ),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", ":1:67: nesting deeper than 64 levels"),
        ("- " * 5000 + "x\n", ":1:129: nesting deeper than 64 levels"),
    ],
)
def test_bad_inputs_never_traceback(tmp_path, content, expected):
    """Run the real console entry point as a subprocess: exit 78, a message, no traceback."""
    f = tmp_path / "feeds.yaml"
    if content == "dir":
        f.mkdir()
    elif isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "feedrunner.cli", "validate", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EX_CONFIG
    assert proc.stdout.startswith(f"{f}")  # every problem names its file first
    assert expected in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_fifty_megabyte_file_is_refused_without_traceback(tmp_path, capsys):
    f = tmp_path / "huge.yaml"
    with f.open("wb") as fh:
        fh.write(b"version: 1\nvenues:\n")
        fh.write((b"  v%d: {adapter: ccxt, exchange: binance, symbols: [A/B]}\n" * 1) * 1)
        fh.write(b"# padding\n" * (5 * 1024 * 1024))
    assert f.stat().st_size == 52_428_877
    assert main(["validate", str(f)]) == EX_CONFIG
    out = capsys.readouterr().out
    assert out == f"{f}: file is 50.0 MiB (52,428,877 bytes); a spec may be at most 8 MiB\n"


def test_schema_documents_every_property():
    """Editors show descriptions: every property has one, directly or through its $ref."""
    from feedrunner.spec import schema

    s = schema()
    defs = s["$defs"]
    missing = []

    def described(node):
        if not isinstance(node, dict):
            return True
        if "description" in node:
            return True
        ref = node.get("$ref", "")
        return ref.startswith("#/$defs/") and "description" in defs[ref.split("/")[-1]]

    def walk(node, where):
        if isinstance(node, dict):
            for key, sub in node.get("properties", {}).items():
                if sub is not False and not described(sub):
                    missing.append(f"{where}.{key}")
            for key, sub in node.items():
                if key not in ("if", "then"):  # discriminator tests and per-adapter refinements
                    walk(sub, f"{where}/{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                walk(sub, f"{where}[{i}]")

    walk(s, "#")
    assert missing == []
    assert s["additionalProperties"] is False


def test_every_object_in_the_schema_denies_unknown_keys():
    from feedrunner.spec import schema

    loose = []

    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object" and "additionalProperties" not in node:
                loose.append(where)
            for key, sub in node.items():
                if key not in ("if",):  # `if` sub-schemas only test a discriminator
                    walk(sub, f"{where}/{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                walk(sub, f"{where}[{i}]")

    walk(schema(), "#")
    assert loose == []
