"""Log output for a process of feedrunner (a runner, a supervisor), as feeds.yaml's logging asks."""

from __future__ import annotations

import sys

from loguru import logger

from feedrunner.spec import Spec


def configure_logging(spec: Spec) -> None:
    logger.remove()
    if spec.log_format == "json":
        logger.add(sys.stderr, level=spec.log_level, serialize=True)
    else:
        logger.add(sys.stderr, level=spec.log_level, format="{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}")
