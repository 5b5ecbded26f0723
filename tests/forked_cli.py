"""Run `obliviate` and `dvc` commands in forked children of one warm process (the kill tests).

A CLI process spends many seconds importing torch, Prefect, DVC, scikit-learn and matplotlib
before a deletion starts, most of it inside the writer lock; the random-kill test runs dozens.
This script imports all of that once, then runs each command it reads on stdin in a child forked
from that state: the real command line (typer app, Prefect flow, deletion, DVC and git) in a
process of its own, which a SIGKILL ends for good, as it would end `obliviate` itself.

Protocol, one JSON object per line. In: {"id", "prog": "obliviate" | "dvc", "argv", "cwd",
"env", "stdout", "stderr"} (files the child's output goes to) and optionally "timeline": a file
the child appends "<event> <seconds since the fork>" to, for each crash point passed and for
"lock" and "unlock" (the writer lock taken, the drain returned), and "kill_in_dvc_lock_write":
true to SIGKILL the child inside DVC's rewrite of dvc.lock. Out: {"ready": seconds, "threads":
n} once, then {"id", "rc"} as each child exits (rc -9: SIGKILL).
"""

from __future__ import annotations

import importlib
import json
import os
import selectors
import signal
import sys
import threading
import time
import traceback

# What `obliviate forget`, `obliviate drain` and `dvc status` import, most of it lazily (inside
# the writer lock): the CLI, the flow, torch's compiler stack (use_deterministic_algorithms), the
# stop rule's nolds with scikit-learn, scipy and pandas, DVC with its git layer, matplotlib (the
# Delta plot), Prefect's engines.
WARM = ["obliviate.cli", "obliviate.deletion", "obliviate.consolidation", "obliviate.compare",
        "obliviate.validate", "flows.consolidation",
        "flows.deletion", "flows.pipeline", "torch._inductor", "nolds", "sklearn.linear_model",
        "sklearn.model_selection", "scipy.stats", "pandas", "dvc.cli", "dvc.repo", "dvc.lock",
        "dvc.rwlock", "dvc.scm", "dvc.cachemgr", "dvc.data_cloud", "scmrepo.git", "dulwich.repo",
        "matplotlib.pyplot", "fastapi", "prefect.flow_engine", "prefect.task_engine"]  # fmt: skip


def trace(path: str) -> None:
    """Append each crash point passed, the lock and the unlock to ``path`` (this child only)."""
    from obliviate import consolidation, deletion, faults, sweep, transaction, versioning

    t0 = time.monotonic()
    passed = faults.crashpoint

    def note(name: str) -> None:
        with open(path, "a") as f:
            f.write(f"{name} {time.monotonic() - t0:.3f}\n")

    def crashpoint(name: str) -> None:
        note(name)
        passed(name)

    for module in (deletion, sweep, transaction, versioning, consolidation):
        module.crashpoint = crashpoint
    arm, drain = deletion.arm_kill_timer, deletion.drain

    def arm_kill_timer() -> None:  # a drain: under the writer lock; a consolidation: at start
        note("lock")
        arm()

    consolidation.arm_kill_timer = arm_kill_timer
    consolidate = consolidation.consolidate

    def traced_consolidate(*args, **kwargs):
        out = consolidate(*args, **kwargs)
        note("unlock")
        return out

    consolidation.consolidate = traced_consolidate

    def traced_drain(*args, **kwargs):
        out = drain(*args, **kwargs)
        note("unlock")
        return out

    deletion.arm_kill_timer, deletion.drain = arm_kill_timer, traced_drain


def kill_in_dvc_lock_write() -> None:
    """SIGKILL this child where DVC rewrites dvc.lock: the file is opened for writing (emptied),
    its new contents not yet written (DVC writes it in place, not by rename)."""
    from dvc.utils.serialize import _yaml

    dump = _yaml._dump

    def killed(data, stream):
        if os.path.basename(getattr(stream, "name", "")) == "dvc.lock":
            os.kill(os.getpid(), signal.SIGKILL)
        return dump(data, stream)

    _yaml._dump = killed


def child(job: dict) -> int:
    os.chdir(job["cwd"])
    os.environ.update(job["env"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = [job["prog"], *job["argv"]]
    if job.get("timeline"):
        trace(job["timeline"])
    if job.get("kill_in_dvc_lock_write"):
        kill_in_dvc_lock_write()
    try:
        if job["prog"] == "dvc":
            from dvc.cli import main as dvc

            return dvc(job["argv"])
        from obliviate.cli import app

        app(job["argv"], prog_name="obliviate")
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)


def main() -> None:
    started = time.monotonic()
    for name in WARM:
        importlib.import_module(name)
    print(json.dumps({"ready": time.monotonic() - started,
                      "threads": threading.active_count()}), flush=True)  # fmt: skip
    running: dict[int, str] = {}
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    pending, open_input = b"", True
    while open_input or running:
        if open_input and selector.select(timeout=0.02):
            chunk = os.read(0, 1 << 16)
            open_input = bool(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                start(json.loads(line), running)
        elif not open_input:
            time.sleep(0.02)
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            rc = os.waitstatus_to_exitcode(status)
            print(json.dumps({"id": running.pop(pid), "rc": rc}), flush=True)


def start(job: dict, running: dict[int, str]) -> None:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child(job)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    running[pid] = job["id"]


if __name__ == "__main__":
    main()
