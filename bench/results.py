"""Read-modify-write of bench/results/latest.json, one key per benchmark."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def record(name: str, figures: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[name] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}",
        **figures,
    }
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)
