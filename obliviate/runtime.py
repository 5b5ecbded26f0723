"""Process-level set-up done by entry points (CLI, tests), never at import time."""

from __future__ import annotations

import logging
import os
from pathlib import Path


def configure_prefect(root: Path) -> None:
    """Run Prefect locally with no server: state under <root>/.prefect, no analytics.

    Must run before prefect is imported. Values already set in the environment win, so a user
    pointing PREFECT_API_URL at a real server keeps it.
    """
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def quiet_console() -> None:
    """Keep Prefect's console output to critical records (call after importing prefect).

    The CLI prints its own one-line results and user errors; run logs still reach the Prefect
    API (and the UI) through Prefect's API handler, which this leaves alone.
    """
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.CRITICAL)
    # A command that ends early (a user error right after its flow started) can leave Prefect's
    # event-loop tasks pending at exit; on a loaded machine asyncio then logs "Task was destroyed
    # but it is pending!" for each, dozens of lines after the one sentence (seen in `make test`
    # under load). Nothing is lost: the command's outcome is printed already.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
