"""Fault injection for the kill tests. Unset (always, outside the tests) both do nothing.

``OBLIVIATE_CRASH_AT=<name>`` SIGKILLs the process at the crash point of that name;
``OBLIVIATE_KILL_AFTER=<seconds>`` SIGKILLs it that long after a deletion took the writer lock
(a random instant, for the random-kill test). The last crash point passed is kept, so a test can
tell where a timed kill landed (``OBLIVIATE_KILL_LOG=<file>``: it is written there on the kill),
as ``name#n`` when the process passed it for the n-th time (``before_dvc_commit#2``: the
metrics' own commit, after the deletion's).
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

CRASH_ENV = "OBLIVIATE_CRASH_AT"
KILL_AFTER_ENV = "OBLIVIATE_KILL_AFTER"
KILL_LOG_ENV = "OBLIVIATE_KILL_LOG"
_last = ["start"]  # the last crash point passed
_passed: Counter[str] = Counter()


def crashpoint(name: str) -> None:
    _passed[name] += 1
    _last[0] = name if _passed[name] == 1 else f"{name}#{_passed[name]}"
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def arm_kill_timer() -> None:
    """Start the timed kill of ``OBLIVIATE_KILL_AFTER``, if set (once per process)."""
    delay = os.environ.pop(KILL_AFTER_ENV, None)
    if delay is None:
        return

    def kill() -> None:
        log = os.environ.get(KILL_LOG_ENV)
        if log:
            with open(log, "a") as f:
                f.write(f"{_last[0]}\n")
        os.kill(os.getpid(), signal.SIGKILL)

    timer = threading.Timer(float(delay), kill)
    timer.daemon = True
    timer.start()
