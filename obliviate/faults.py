"""Fault injection for the kill tests: ``OBLIVIATE_CRASH_AT=<name>`` SIGKILLs the process at the
crash point of that name. Unset (always, outside the tests) it does nothing."""

from __future__ import annotations

import os
import signal

CRASH_ENV = "OBLIVIATE_CRASH_AT"


def crashpoint(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
