"""SIGKILL at random instants of a deletion, through `obliviate forget` and through `obliviate
request` + `obliviate drain`; after recovery by the user's own next command the workspace is
exactly the state of an uninterrupted deletion, with the request finished once.

Each kill gets a fresh copy of the session's template workspace (see e2e.py) and forgets the
same sample, so uninterrupted reference runs give the new state every kill must end in: store
rows bit for bit, sample ids, one audit record, no staging, the journal finished without raw ids
and no metric refresh owed, `dvc status` clean, git clean with the same number of commits, the
same metrics. (The old state, the template's, would mean the request was done without its
deletion: it is durable before the writer lock is taken, so recovery always finishes it.)

The contract of the next command (a request is done at its deletion's commit; the metric
refresh is a separate step the journal owes until it is paid): a retried `forget` reports the
deletion ("forgot 1 sample(s)") unless the killed one had finished its request and paid the
refresh (then "already forgotten"); the next `drain` reports the request done unless the killed
one had done so. Either way it pays a refresh still owed.

Where the kills land: the reference runs are timed by their crash points, which cut the locked
section into phase windows (recovery and claim, retraining, staging, apply, DVC and git, done,
the metric refresh). Each kill targets a phase in turn, at a seeded random instant inside one of
its windows, scaled by how fast the victims have run so far next to the references (measured
from each victim's own crash-point timeline: a loaded machine slows them all alike). A kill
that comes too late (the deletion had ended) is drawn again, until 12 forget and 8 drain kills
have landed, within a bounded number of tries; the seed is printed (OBLIVIATE_KILL_SEED
replays it). Kills at fixed crash points (the lifecycle's transitions, the DVC and git commits,
the metric refresh) come on top.

Speed: a CLI process imports for many seconds before it works, most of it inside the writer
lock, and without PREFECT_API_URL it starts Prefect's ephemeral server too. So the commands run
in children forked from one warm process (tests/forked_cli.py: the real typer app, flow and
deletion, each in its own process, killed for good), against one `prefect server` on loopback,
two kills at a time.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from e2e import env_for, final_state, unique_sample
from test_serve import api, free_port, start, stop, wait_for

pytestmark = pytest.mark.slow
pytest_plugins = ["e2e"]  # the session's template workspace

FORGET_KILLS, DRAIN_KILLS = 12, 8  # random kills that must land (a process killed mid-drain)
MAX_TRIES = 3 * (FORGET_KILLS + DRAIN_KILLS)  # random kills drawn at most, landed or not
FIXED = ["after_claim", "before_dvc_commit", "before_git_commit", "before_done",
         "refresh_metrics"]  # through forget, on top  # fmt: skip
DVC_LOCK_WRITE = "inside DVC's write of dvc.lock"  # (tests/forked_cli.py kills the child there)
PARALLEL = 2
COVER = ("retraining", "apply")  # phases the random kills must reach
# the last crash point a kill passed (obliviate/faults.py) -> the phase it landed in; "#2": the
# second time the process passed that point (the metrics' own DVC and git commit)
PHASES = {
    "start": "recovery, claim, checks",
    "after_claim": "retraining: the guard and staging set up",
    "before_retrain": "retraining",
    "during_retrain": "retraining",
    "after_retrain": "staging",
    "before_commit": "staging",
    "after_store": "apply",
    "after_block": "apply",
    "after_audit": "apply",
    "before_dvc_commit": "apply: DVC commit",
    "before_git_commit": "apply: git commit",
    "after_commit": "apply: cache purge",
    "before_done": "done: the requests' transition",
    "refresh_metrics": "metric refresh",
    "before_dvc_commit#2": "metric refresh: DVC commit",
    "before_git_commit#2": "metric refresh: git commit",
    "after_unlock": "after the deletion (the Delta plot, Prefect artifacts)",
}


def phase(landed: str) -> str:
    """The phase a kill landed in, from the last crash point it passed."""
    return PHASES.get(landed) or PHASES.get(landed.split("#")[0], "?")


@dataclass
class Ran:
    rc: int
    out: str
    err: str


class ForkedCLI:
    """tests/forked_cli.py: each `run` is one command in a forked child; several at a time."""

    def __init__(self, folder: Path, env: dict):
        self.folder, self.ids = folder, itertools.count()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("forked_cli.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=folder,
        )  # fmt: skip
        self.waiting: dict[str, Future] = {}
        self.lock = threading.Lock()

    def ready(self) -> dict:
        hello = json.loads(self.proc.stdout.readline() or "{}")
        threading.Thread(target=self._answers, daemon=True).start()
        return hello

    def _answers(self) -> None:
        for line in self.proc.stdout:
            answer = json.loads(line)
            with self.lock:
                self.waiting.pop(answer["id"]).set_result(answer["rc"])

    def run(self, ws: Path, *argv: str, prog="obliviate", timeline=None,
            kill_in_dvc_lock_write=False, **env) -> Ran:  # fmt: skip
        job = f"{next(self.ids)}"
        out, err = self.folder / f"{job}.out", self.folder / f"{job}.err"
        done: Future = Future()
        line = {"id": job, "prog": prog, "argv": list(argv), "cwd": str(ws), "env": env,
                "stdout": str(out), "stderr": str(err), "timeline": timeline and str(timeline),
                "kill_in_dvc_lock_write": kill_in_dvc_lock_write}  # fmt: skip
        with self.lock:
            self.waiting[job] = done
            self.proc.stdin.write(json.dumps(line) + "\n")
            self.proc.stdin.flush()
        rc = done.result(timeout=600)
        ran = Ran(rc, out.read_text(), err.read_text())
        out.unlink(), err.unlink()
        return ran

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(120)


@pytest.fixture(scope="module")
def cli(template, tmp_path_factory):
    """The warm process and one real Prefect server (its database copied from the template's,
    already migrated), started side by side."""
    folder = tmp_path_factory.mktemp("forked-cli")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    (folder / "server").mkdir()
    for db in (template / ".prefect").glob("prefect.db*"):
        shutil.copy(db, folder / "server")
    quiet = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    log = folder / "server.log"
    server_env = {**env_for(folder), **quiet, "PREFECT_HOME": str(folder / "server")}
    server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                    "--port", str(port), "--no-services", "--no-ui"], server_env, log)  # fmt: skip
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    forked = ForkedCLI(folder, {**env_for(folder), **quiet, "PREFECT_API_URL": url,
                                "PREFECT_HOME": str(folder / "client"),
                                "PYTHONPATH": python_path})  # fmt: skip
    try:
        t0 = time.monotonic()
        hello = forked.ready()
        assert "ready" in hello, "tests/forked_cli.py did not start"
        wait_for(lambda: api(url, "/health") is True, 180, "the Prefect server", [log])
        print(f"\nwarm process {hello['ready']:.1f} s ({hello['threads']} thread(s)), "
              f"server up after {time.monotonic() - t0:.1f} s")  # fmt: skip
        yield forked
    finally:
        forked.close()
        stop(server)


def state(ws: Path, cli: ForkedCLI) -> dict:
    """final_state, plus the journal (statuses, raw ids, the metric refresh), git and the
    refreshed metrics."""
    from obliviate import lifecycle
    from obliviate.audit import read_records
    from obliviate.config import load_config

    got = final_state(ws, dvc=lambda ws: cli.run(ws, "status", prog="dvc").out.strip())
    cfg = load_config(ws / "params.yaml")
    git = [["git", "rev-list", "--count", "HEAD"], ["git", "status", "--porcelain"]]
    requests = lifecycle.entries(cfg)
    got |= {
        "raw_ids": [e["request_id"] for e in requests if e.get("ids")],
        "refresh_owed": lifecycle.refresh_owed(cfg),
        # every request names the deletion the audit holds (not one that never landed)
        "by_audited": {e.get("deletion") for e in requests}
        <= {r["request_id"] for r in read_records(cfg.paths.audit)},
        "git": [subprocess.run(c, cwd=ws, capture_output=True, text=True).stdout for c in git],
        "metrics": {p.name: json.loads(p.read_text()) for p in cfg.paths.metrics.glob("*.json")},
    }
    return got


def differences(got: dict, want: dict, requests: int = 1) -> list[str]:
    """The keys of ``got`` that differ from ``want``, the journal holding ``requests`` requests."""
    same = {k: np.array_equal(got[k], want[k]) if k == "rows" else got[k] == want[k] for k in want}
    same["requests"] = got["requests"] == want["requests"] * requests
    return [k for k, ok in same.items() if not ok]


def at_kill(ws: Path) -> tuple[str, bool]:
    """The request's status right after a kill, and whether a metric refresh is owed."""
    from obliviate import lifecycle
    from obliviate.config import load_config

    cfg = load_config(ws / "params.yaml")
    statuses = [e["status"] for e in lifecycle.entries(cfg)]
    return ("done" if statuses == ["done"] else ",".join(statuses)), bool(
        lifecycle.refresh_owed(cfg)
    )


@dataclass
class Kill:
    path: str  # "forget" or "drain"
    delay: float | None  # seconds after the lock (None: a fixed crash point)
    landed: str | None  # the last crash point passed when it fired (None: it did not fire)
    seconds: float
    pace: float | None = None  # the victim's time over the reference's, to its last crash point
    empty_lock: bool = False  # it left dvc.lock empty (killed inside DVC's rewrite of it)

    @property
    def inside(self) -> bool:
        """A random kill that killed a deletion (not one due after it ended)."""
        return self.delay is not None and self.landed not in (None, "after_unlock")


def copy_of(template: Path, ws: Path) -> Path:
    shutil.copytree(template, ws, symlinks=True, ignore=shutil.ignore_patterns(".prefect"))
    return ws


def timeline(path: Path) -> list[tuple[str, float]]:
    """(event, seconds after the writer lock was taken) from a child's timeline file."""
    events = [(name, float(t)) for name, t in map(str.split, path.read_text().splitlines())]
    lock = dict(events).get("lock", 0.0)
    return [(name, t - lock) for name, t in events if name != "lock"]


@dataclass
class Reference:
    sid: str
    old: dict  # the template's state
    new: dict  # after one uninterrupted `obliviate forget sid`
    span: float  # seconds its drain held the writer lock
    events: list[tuple[str, float]]  # (crash point, seconds after the lock) in that run

    def windows(self) -> dict[str, list[tuple[float, float]]]:
        """The locked section cut at the crash points: phase -> its (start, end) windows."""
        cuts = [("start", 0.0), *self.events, ("unlock", self.span)]
        out: dict[str, list[tuple[float, float]]] = {}
        for (name, t0), (_, t1) in itertools.pairwise(cuts):
            if name != "unlock" and t1 > t0:
                out.setdefault(phase(name), []).append((t0, t1))
        return out

    def pace(self, events: list[tuple[str, float]]) -> float | None:
        """A victim's time over the reference's, at the last crash point both passed."""
        ref = dict(self.events) | {"unlock": self.span}
        shared = [(name, t) for name, t in events if ref.get(name, 0) > 0.05]
        return shared[-1][1] / ref[shared[-1][0]] if shared else None


@pytest.fixture(scope="module")
def reference(cli, template, tmp_path_factory) -> Reference:
    """Uninterrupted deletions through the CLI, two at a time as the kills will run, each timed
    by its crash points. Both must end in the same state, bit for bit: the new state every kill
    must end in."""
    folder = tmp_path_factory.mktemp("reference")
    sid, _ = unique_sample(template)
    old = state(copy_of(template, folder / "old"), cli)

    def run(ws: Path) -> tuple[dict, list[tuple[str, float]]]:
        copy_of(template, ws)
        done = cli.run(ws, "forget", sid, timeline=ws.with_suffix(".timeline"))
        assert done.rc == 0 and done.out.startswith("forgot 1 sample(s)"), done.err
        return state(ws, cli), timeline(ws.with_suffix(".timeline"))

    with ThreadPoolExecutor(PARALLEL) as pool:
        runs = list(pool.map(run, [folder / f"ws{i}" for i in range(PARALLEL)]))
    (new, times), *others = runs
    assert all(not differences(other, new) for other, _ in others)  # deterministic
    assert sid not in new["ids"] and len(new["models"]) == 1 and new["requests"] == ["done"]
    assert "up to date" in new["dvc"] and new["git"][1] == "" and new["staging"] == []
    assert new["refresh_owed"] is None and new["raw_ids"] == []
    spans = [dict(t)["unlock"] for _, t in runs]
    events = [(name, t) for name, t in times if name != "unlock"]
    return Reference(sid, old, new, float(np.mean(spans)), events)


def kill_and_recover(cli, template, ws: Path, ref: Reference, path: str,
                     delay: float | None = None, point: str | None = None) -> Kill:  # fmt: skip
    """One kill in a fresh copy, recovery by the user's next command, the state check."""
    t0 = time.monotonic()
    copy_of(template, ws)
    log, times = ws.with_suffix(".log"), ws.with_suffix(".timeline")
    if point == DVC_LOCK_WRITE:
        fault = {"kill_in_dvc_lock_write": True}
    elif point:
        fault = {"OBLIVIATE_CRASH_AT": point}
    else:
        fault = {"OBLIVIATE_KILL_AFTER": f"{delay:.3f}", "OBLIVIATE_KILL_LOG": str(log)}
    if path == "forget":
        victim = cli.run(ws, "forget", ref.sid, timeline=times, **fault)
    else:
        assert cli.run(ws, "request", ref.sid).rc == 0
        victim = cli.run(ws, "drain", timeline=times, **fault)
    where = f"{path} killed at {point or f'{delay:.2f} s'}"
    assert victim.rc in (-9, 0), f"{where}: it failed instead:\n{victim.err}"
    assert victim.rc == -9 or not point, f"{where}: never passed that point"
    pace = ref.pace(timeline(times)) if times.is_file() else None
    landed, empty_lock, queued = None, False, False
    if victim.rc == -9:  # else the kill was due after the drain: nothing to recover
        landed = point or log.read_text().strip()
        empty_lock = (ws / "dvc.lock").stat().st_size == 0
        status, owed = at_kill(ws)
        queued = status == "queued"
        where += f" ({landed}, request {status}{', refresh owed' if owed else ''}"
        where += f"{', dvc.lock left empty' if empty_lock else ''})"
        # the user's next command: the same forget again, or the next drain
        again = cli.run(ws, "forget", ref.sid) if path == "forget" else cli.run(ws, "drain")
        assert "Traceback" not in again.err, f"{where}:\n{again.err}"
        if path == "forget" and status == "done" and not owed:  # the command had finished
            assert again.rc == 2 and "already forgotten" in again.err, f"{where}: {again.err}"
        elif path == "forget":  # reported done, never "already forgotten"
            assert again.rc == 0, f"{where}:\n{again.err}"
            assert again.out.startswith("forgot 1 sample(s)"), f"{where}: {again.out}"
        else:  # finished once: by this drain, unless the killed one had
            n = 0 if status == "done" else 1
            assert again.rc == 0, f"{where}:\n{again.err}"
            assert again.out.startswith(f"drained: {n} request(s) done"), f"{where}: {again.out}"
    got = state(ws, cli)
    # A forget killed before its drain claimed its request leaves it queued; the retry queues
    # its own and one deletion finishes both. (One killed later is running: the retry joins it.)
    wrong = differences(got, ref.new, 2 if queued and path == "forget" else 1)
    kill = Kill(path, delay, landed, time.monotonic() - t0, pace, empty_lock)
    if wrong:
        old = "" if differences(got, ref.old) else " (this is the old state: the request was lost)"
        diff = "".join(f"\n  {k}: {got[k]!r:.300} != {ref.new[k]!r:.300}" for k in wrong
                       if k != "rows")  # fmt: skip
        raise AssertionError(
            f"{where}: after recovery {wrong} differ from an uninterrupted deletion's{old}{diff}"
        )
    shutil.rmtree(ws)
    return kill


def test_random_sigkills_through_the_cli_leave_the_old_or_the_new_state(
    cli, template, reference, tmp_path
):
    t_start = time.monotonic()
    seed = int(os.environ.get("OBLIVIATE_KILL_SEED", random.randrange(1 << 32)))
    print(f"random-kill seed {seed} (OBLIVIATE_KILL_SEED={seed} replays it)")
    rng = random.Random(seed)
    windows = reference.windows()
    points = ", ".join(f"{t:.2f} {name}" for name, t in reference.events)
    print(f"the reference deletions held the writer lock {reference.span:.2f} s (mean); crash "
          f"points at {points}")  # fmt: skip
    targets = itertools.cycle([p for p in windows if not p.startswith("after the deletion")])
    kills: list[Kill] = []
    failures: list[str] = []
    names = (tmp_path / f"kill-{i}" for i in itertools.count())

    def run_all(plan: list[tuple]) -> None:
        with ThreadPoolExecutor(PARALLEL) as pool:
            runs = [pool.submit(kill_and_recover, cli, template, next(names), reference, path,
                                delay, point) for path, delay, point in plan]  # fmt: skip
            for run in runs:
                try:
                    kills.append(run.result())
                except AssertionError as failure:  # every kill's verdict, not only the first
                    failures.append(str(failure).split("\nassert ")[0])

    def pace() -> float:
        """How fast the victims ran next to the references so far (1: alike)."""
        seen = [k.pace for k in kills if k.pace]
        return float(np.clip(np.median(seen), 0.25, 4.0)) if seen else 1.0

    def draw(path: str) -> tuple[str, float, None]:
        wanted = next(targets)
        t0, t1 = rng.choices(windows[wanted], weights=[b - a for a, b in windows[wanted]])[0]
        return path, rng.uniform(t0, t1) * pace(), None

    def short() -> Counter:
        landed = Counter(k.path for k in kills if k.inside)
        return Counter(forget=FORGET_KILLS, drain=DRAIN_KILLS) - landed

    run_all([("forget", None, point) for point in FIXED])
    tries = 0
    while not failures and short() and tries < MAX_TRIES:
        todo = list(short().elements())
        rng.shuffle(todo)
        batch = [draw(path) for path in todo[:PARALLEL]]
        tries += len(batch)
        run_all(batch)

    def reached(wanted: str) -> bool:
        return any(phase(k.landed).startswith(wanted) for k in kills if k.inside)

    for wanted in COVER:  # timing noise left a phase without a kill: aim at it until it has one
        while not failures and tries < MAX_TRIES and not reached(wanted):
            t0, t1 = rng.choice(windows[wanted])
            run_all([(rng.choice(["forget", "drain"]), rng.uniform(t0, t1) * pace(), None)])
            tries += 1

    inside = [k for k in kills if k.inside]
    by_path = Counter(k.path for k in inside)
    where = Counter(k.landed for k in inside)
    late = sum(k.delay is not None and not k.inside for k in kills)
    print(f"{len(inside)} random kills landed in {tries} tries ({by_path['forget']} forget, "
          f"{by_path['drain']} drain; {late} were due after the deletion had ended; victims ran "
          f"at {pace():.2f}x the references' time); the last crash point each passed:")  # fmt: skip
    for name, count in sorted(where.items(), key=lambda item: -item[1]):
        print(f"  {count:3d}  {name:22s} {phase(name)}")
    print(f"and {len(FIXED)} at fixed points: {', '.join(FIXED)}; per kill with its recovery and "
          f"checks {np.median([k.seconds for k in kills]):.1f} s (median, {PARALLEL} at a time); "
          f"{time.monotonic() - t_start:.0f} s in all")  # fmt: skip
    assert not failures, f"{len(failures)} kill(s) went wrong:\n" + "\n".join(failures)
    assert by_path["forget"] >= FORGET_KILLS and by_path["drain"] >= DRAIN_KILLS, (tries, where)
    phases = {phase(name) for name in where}
    assert all(any(p.startswith(wanted) for p in phases) for wanted in COVER), where


def test_a_kill_inside_dvcs_rewrite_of_dvc_lock_is_recovered(cli, template, reference, tmp_path):
    """DVC rewrites dvc.lock in place: a kill there leaves it empty. Recovery restores it from
    git's HEAD before committing (it used to find no stage to commit and git-commit the empty
    file, exit 0), and the state is the new one."""
    kill = kill_and_recover(
        cli, template, tmp_path / "ws", reference, "forget", point=DVC_LOCK_WRITE
    )
    assert kill.landed == DVC_LOCK_WRITE and kill.empty_lock  # and yet: the new state


# --------------------------------------------------------------------------- consolidations

# the crash points of a consolidation's commit: computing (no lock), staged, installed, audited,
# DVC-committed, then the metric refresh it owes
CONSOLIDATION_FIXED = ["during_consolidation", "before_consolidation_commit", "after_store",
                       "after_audit", "after_commit", "refresh_metrics"]  # fmt: skip
CONSOLIDATION_KILLS = 4  # random instants that must land inside a consolidation
# a forget running beside a consolidation, killed at each of its lifecycle's crash points
OVERLAP_FIXED = ["after_claim", "before_commit", "after_store", "after_commit", "before_done"]
OVERLAP_KILLS = 3  # and at random instants
# what must be the same after any interleaving that ends exact: the rows (every one the naive
# retrain's), the samples, the journal, DVC and git clean, the metrics of the served model
EXACT_KEYS = ("rows", "ids", "staging", "requests", "dvc", "raw_ids", "refresh_owed",
              "by_audited", "metrics")  # fmt: skip


@dataclass
class Approximate:
    base: Path  # the template after one uninterrupted forget: one approximate deletion
    new: dict  # after one uninterrupted `obliviate consolidate` of it
    events: list[tuple[str, float]]  # the consolidation's crash points, seconds after its start
    span: float


@pytest.fixture(scope="module")
def approximate(cli, template, reference, tmp_path_factory) -> Approximate:
    """The template with reference.sid forgotten (approximate), and two uninterrupted
    consolidations of it: the same state, bit for bit, and the naive model's."""
    folder = tmp_path_factory.mktemp("approximate")
    base = copy_of(template, folder / "base")
    assert cli.run(base, "forget", reference.sid).rc == 0
    assert "exact through row" in cli.run(base, "status").out

    def run(ws: Path) -> tuple[dict, list[tuple[str, float]]]:
        copy_of(base, ws)
        done = cli.run(ws, "consolidate", timeline=ws.with_suffix(".timeline"))
        assert done.rc == 0 and done.out.startswith("consolidated"), done.err
        return state(ws, cli), timeline(ws.with_suffix(".timeline"))

    with ThreadPoolExecutor(PARALLEL) as pool:
        (new, times), (other, _) = pool.map(run, [folder / "ws0", folder / "ws1"])
    assert not differences(other, new)
    assert "up to date" in new["dvc"] and new["git"][1] == "" and new["staging"] == []
    naive = cli.run(folder / "ws0", "retrain", "--naive")
    assert "served P_B and naive P_B: byte-identical" in naive.out, naive.out + naive.err
    span = dict(times)["unlock"]
    return Approximate(base, new, [(n, t) for n, t in times if n != "unlock"], span)


def fault_env(point: str | None, delay: float | None, log: Path) -> dict:
    if point:
        return {"OBLIVIATE_CRASH_AT": point}
    return {"OBLIVIATE_KILL_AFTER": f"{delay:.3f}", "OBLIVIATE_KILL_LOG": str(log)}


def consolidation_killed(cli, approx: Approximate, ws: Path, delay=None, point=None) -> str:
    """Kill `obliviate consolidate` once; the next `obliviate consolidate` must end in the
    state of an uninterrupted one. Returns where the kill landed ('' when it came too late)."""
    copy_of(approx.base, ws)
    log = ws.with_suffix(".log")
    victim = cli.run(ws, "consolidate", **fault_env(point, delay, log))
    where = f"consolidate killed at {point or f'{delay:.2f} s'}"
    assert victim.rc in (-9, 0), f"{where}: it failed instead:\n{victim.err}"
    assert victim.rc == -9 or not point, f"{where}: never passed that point"
    landed = "" if victim.rc == 0 else point or log.read_text().strip()
    if landed:
        again = cli.run(ws, "consolidate")
        assert again.rc == 0 and "Traceback" not in again.err, f"{where}:\n{again.err}"
    wrong = differences(state(ws, cli), approx.new)
    assert not wrong, f"{where} ({landed}): after the next run {wrong} differ"
    shutil.rmtree(ws)
    return landed


def test_kills_inside_a_consolidation_end_in_the_new_state_after_the_next_run(
    cli, approximate, tmp_path
):
    rng = random.Random(int(os.environ.get("OBLIVIATE_KILL_SEED", random.randrange(1 << 32))))
    names = (tmp_path / f"kill-{i}" for i in itertools.count())

    def kill(point=None, delay=None) -> str:
        return consolidation_killed(cli, approximate, next(names), delay, point)

    with ThreadPoolExecutor(PARALLEL) as pool:
        fixed = list(pool.map(lambda point: kill(point=point), CONSOLIDATION_FIXED))
    assert fixed == CONSOLIDATION_FIXED
    landed, tries = [], 0
    while len(landed) < CONSOLIDATION_KILLS and tries < 3 * CONSOLIDATION_KILLS:
        delays = [rng.uniform(0, approximate.span) for _ in range(PARALLEL)]
        tries += len(delays)
        with ThreadPoolExecutor(PARALLEL) as pool:
            landed += [x for x in pool.map(lambda delay: kill(delay=delay), delays) if x]
    print(f"consolidation kills: {len(fixed)} at fixed points, {len(landed)} random in {tries} "
          f"tries, last crash points passed: {Counter(landed)}")  # fmt: skip
    assert len(landed) >= CONSOLIDATION_KILLS


def test_a_forget_killed_beside_a_consolidation_ends_exact_and_once(cli, approximate, tmp_path):
    """A consolidation runs while a forget of a sample in an earlier block is killed (at each
    crash point of the forget, and at random instants): after the user's next forget and one
    more consolidation, the store is exact (every row the naive retrain's on the final blocks,
    the same bytes as forget-then-consolidate without any kill), the request done once."""
    from e2e import unique_sample

    sid2, _ = unique_sample(approximate.base, block=2)
    ref = copy_of(approximate.base, tmp_path / "reference")
    assert cli.run(ref, "forget", sid2).rc == 0 and cli.run(ref, "consolidate").rc == 0
    want = state(ref, cli)
    rng = random.Random(int(os.environ.get("OBLIVIATE_KILL_SEED", random.randrange(1 << 32))))
    plan = [(p, None) for p in OVERLAP_FIXED] + [
        (None, rng.uniform(0, 1.0)) for _ in range(OVERLAP_KILLS)]  # fmt: skip

    def overlap(i: int, point: str | None, delay: float | None) -> str:
        ws = copy_of(approximate.base, tmp_path / f"overlap-{i}")
        log = ws.with_suffix(".log")
        fault = fault_env(point, delay, log)
        with ThreadPoolExecutor(2) as both:
            consolidating = both.submit(cli.run, ws, "consolidate", "--wait", "600")
            forgetting = both.submit(cli.run, ws, "forget", sid2, "--wait", "600", **fault)
            victim, beside = forgetting.result(), consolidating.result()
        where = f"forget killed at {point or f'{delay:.2f} s'} beside a consolidation"
        assert victim.rc in (-9, 0) and beside.rc == 0, f"{where}:\n{victim.err}\n{beside.err}"
        if victim.rc == -9:
            again = cli.run(ws, "forget", sid2)
            assert again.rc in (0, 2) and "Traceback" not in again.err, f"{where}:\n{again.err}"
        assert cli.run(ws, "consolidate").rc == 0
        got = state(ws, cli)
        same = {k: np.array_equal(got[k], want[k]) if k == "rows" else got[k] == want[k]
                for k in EXACT_KEYS if k != "requests"}  # fmt: skip
        # a forget killed before its request was claimed leaves it queued: the retry's joins it
        same["requests"] = set(got["requests"]) == {"done"} and len(got["requests"]) in (2, 3)
        wrong = [k for k, ok in same.items() if not ok]
        assert not wrong, f"{where}: {wrong} differ from forget-then-consolidate's"
        shutil.rmtree(ws)
        return point or (log.read_text().strip() if log.is_file() else "late")

    with ThreadPoolExecutor(PARALLEL) as pool:
        landed = list(pool.map(lambda a: overlap(*a), [(i, *x) for i, x in enumerate(plan)]))
    print(f"forgets killed beside a consolidation: {Counter(landed)}")
    assert landed[: len(OVERLAP_FIXED)] == OVERLAP_FIXED
