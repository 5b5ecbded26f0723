"""A deletion end to end: validate, journal, retrain with the stop rule, stage, apply, refresh.

``drain`` is the one orchestration of deletion requests; the Prefect flow (flows/drain.py) runs
it for `obliviate forget`, `obliviate drain` and the scheduled deployment, and ``forget`` runs it
in-process (the benchmarks and tests).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from obliviate import inbox, versioning
from obliviate import transaction as txn
from obliviate.audit import Forgotten, IdHasher, read_records, redact
from obliviate.compat import require_usable
from obliviate.config import Config
from obliviate.errors import ObliviateError, RequestError
from obliviate.evaluate import test_accuracy
from obliviate.faults import arm_kill_timer, crashpoint
from obliviate.fsck import preflight
from obliviate.gate import owner_hashes
from obliviate.guard import Guard
from obliviate.hashing import file_digest, model_hash
from obliviate.objectstore import require_local
from obliviate.partition import block_entry, load_block, read_manifest
from obliviate.plots import plot_deltas
from obliviate.requests import plan_deletion
from obliviate.stoprule import StopRule
from obliviate.store import ParamStore
from obliviate.sweep import sweep
from obliviate.train import Trainer
from obliviate.verify import verify


def stop_rule(cfg: Config) -> StopRule:
    f = cfg.forget
    return StopRule(f.epsilon, f.min_blocks, f.max_blocks, f.method)


def expected_tail(cfg: Config) -> int:
    """Blocks a sweep is expected to retrain after its last affected block: the median over the
    last 20 deletions, or forget.min_blocks before there are any."""
    tails = [r["stop_block"] - r["last_affected_block"] + 1
             for r in read_records(cfg.paths.audit)[-20:] if r.get("stop_block")]  # fmt: skip
    return int(np.median(tails)) if tails else cfg.forget.min_blocks


def plan_sweeps(plan: dict[int, list[str]], tail: int) -> list[dict[int, list[str]]]:
    """Group a request's blocks into sweeps with a cost model.

    A sweep over blocks d..d_last retrains about (d_last - d) + tail blocks. Letting the next
    affected block join the sweep costs the gap to it; giving it a sweep of its own costs another
    tail. So a block joins the current sweep when its gap is at most ``tail``, else it starts a
    new one. Validation samples (block 0) go with the first sweep: nothing retrains for them.
    """
    groups: list[dict[int, list[str]]] = []
    for k in sorted(k for k in plan if k > 0):
        if groups and k - max(groups[-1]) <= tail:
            groups[-1][k] = plan[k]
        else:
            groups.append({k: plan[k]})
    if 0 in plan:
        groups = [{0: plan[0], **(groups[0] if groups else {})}, *groups[1:]]
    return groups


def compute(
    cfg: Config,
    request_id: str,
    ids: list[str],
    force: bool,
    plan: dict | None = None,
    journal_id: str | None = None,
    sweep_plan: dict | None = None,
    trainer: Trainer | None = None,
) -> dict:
    """Retrain, stitch, judge and stage one deletion (nothing visible changes yet).

    A request the planner splits into several sweeps is staged and applied one sweep at a time
    (``request_id`` names the sweep, ``journal_id`` the journaled request; ``sweep_plan`` is
    recorded in the audit). M' is evaluated once, on the validation split, by the accuracy guard;
    that evaluation is the audit record's accuracy. The test-set metric comes after the commit
    (``refresh_metrics``). A user error on the way (a damaged block found mid-sweep, a model
    that no longer builds) closes the journal entry as refused, with the ids redacted, and
    drops the staging folder, so that recovery does not retry it forever. A store that does not
    fit today's params, model or device stops it without closing the entry: that is fixed by
    restoring them, and recovery then finishes the request. ``trainer``: the one the drain's
    checks built for these blocks, to reuse (None: build one)."""
    usable = _usable_store(cfg, trainer)  # else stop, journal kept
    try:
        return _compute(cfg, request_id, ids, force, plan, journal_id, sweep_plan, usable)
    except ObliviateError as exc:
        why = redact(str(exc), ids, IdHasher.of(cfg))
        state = txn.State.of(cfg)
        txn.finish_request(state, journal_id or request_id, status="refused", why=why)
        shutil.rmtree(state.staging / f".tmp-{request_id}", ignore_errors=True)
        raise


def _compute(cfg, request_id, ids, force, plan, journal_id, sweep_plan, usable) -> dict:
    start = time.time()
    plan = plan or plan_deletion(ids, cfg.paths.blocks, Forgotten.of(cfg), force)
    store, trainer = usable
    guard = Guard(cfg, trainer, store, exclude=plan.get(0, []))  # never judge on what leaves
    before = store.read_params(store.n_blocks)
    manifest = read_manifest(cfg.paths.blocks)
    staging = txn.begin(cfg, request_id, store)
    training = {k: v for k, v in plan.items() if k > 0}  # block 0, validation: never trained on
    result = None
    if training:
        judge = guard.judge if guard.enabled else None
        crashpoint("before_retrain")
        result = sweep(trainer, store, training, stop_rule(cfg), judge, staging.put)
        summary, served = result.summary(), result.served
        new_blocks = dict(result.new_blocks)
        rows = list(range(result.first, result.stop + 1))
    else:
        summary, served, new_blocks, rows = _nothing_retrained(), before, {}, []
    crashpoint("after_retrain")
    dropped_slots = []
    if 0 in plan:
        val = load_block(cfg.paths.blocks, 0)
        leaving = np.isin(val.ids, plan[0])
        new_blocks[0] = val.take(~leaving)
        dropped_slots = val.slot[leaving].tolist()  # their reference predictions go too
    verdict = (result.verdict if result else None) or guard.judge(served)
    superseded = [
        file_digest(f, "md5") for f in txn.superseded_files(cfg, store, sorted(plan), rows)
    ]
    record = {
        "request_id": request_id,
        **IdHasher.of(cfg).hashes(ids),  # sample_id_hashes, keyed (see audit.py)
        "blocks": sorted(plan),
        "epsilon": cfg.forget.epsilon,
        "method": cfg.forget.method,
        **{k: v for k, v in summary.items() if not k.endswith("_seconds")},
        "guard": None if verdict is None else verdict.as_dict(),
        "timings_s": {
            "retrain": summary.get("train_seconds", 0.0),
            "sweep": summary.get("total_seconds", 0.0),
            "compute": time.time() - start,
        },
        "model_before": model_hash(before),
        "model_after": model_hash(served),
        "blocks_before": {str(k): block_entry(manifest, k)["sha256"] for k in sorted(plan)},
        "val_accuracy_after": None if verdict is None else verdict.accuracy,
        "sweep_plan": sweep_plan,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "new_blocks": new_blocks,  # staged as files, not kept in the record
    }
    last = sweep_plan is None or sweep_plan["part"] == len(sweep_plan["sweeps"])
    journal = {"journal_id": journal_id or request_id, "last_part": last,
               "reference_drop": dropped_slots}  # fmt: skip
    return txn.stage(cfg, staging, request_id, result, record, superseded, journal)


def _nothing_retrained() -> dict:
    """The sweep summary of a request whose samples are all in the validation split."""
    return {"first_block": None, "last_affected_block": None, "stop_block": None, "t": 0,
            "retrained_blocks": 0, "reason": "validation_only", "guard_rejections": 0,
            "deltas": [], "fits": []}  # fmt: skip


def refresh_metrics(cfg: Config, after: str, trainer: Trainer | None = None) -> dict:
    """After a deletion is committed: the served model's test accuracy (metrics/evaluate.json)
    and, where the verifying owner can be judged, the backdoor gate (metrics/verify.json, else
    marked stale), versioned as their DVC stages. Off the deletion's critical path: a crash or a
    failure here leaves stale metrics that `dvc repro` refreshes, never a half-done deletion, so
    a failure is returned (``stale``: its sentence), not raised. ``trainer``: one already built
    for this model, to evaluate with."""
    try:
        return _refresh_metrics(cfg, after, trainer)
    except ObliviateError as exc:
        return {"accuracy": None, "versioned": None, "stale": str(exc)}


def _refresh_metrics(cfg: Config, after: str, trainer: Trainer | None) -> dict:
    store = ParamStore.open(cfg.paths.store)
    trainer = trainer or Trainer.from_config(cfg)
    served = store.read_params(store.n_blocks)
    metrics = {"evaluate.json": {"accuracy": test_accuracy(cfg, trainer, served),
                                 "n_test": _n_test(cfg), "checkpoint": store.n_blocks}}  # fmt: skip
    if _can_verify(cfg, read_manifest(cfg.paths.blocks)):
        metrics["verify.json"] = verify(cfg, served, trainer)
    elif (cfg.paths.metrics / "verify.json").is_file():  # never leave an old verdict standing
        stale = "a deletion changed the model; run `obliviate verify`"
        metrics["verify.json"] = {"status": "stale", "passed": False, "sentence": stale}
    for name, content in metrics.items():
        txn.write_json_atomic(cfg.paths.metrics / name, content)
    paths = [cfg.paths.metrics / name for name in metrics]
    versioned = versioning.commit(cfg, paths, f"obliviate: metrics after {after}")
    return {"accuracy": metrics["evaluate.json"]["accuracy"], "versioned": versioned}


def _usable_store(cfg: Config, trainer: Trainer | None = None) -> tuple[ParamStore, Trainer]:
    """The store and trainer of a deletion (``compat.require_usable``). ``trainer``: reuse one
    built for the same params and blocks (building one costs about as much as retraining a
    small block)."""
    require_local(cfg.paths.store)
    store = ParamStore.open(cfg.paths.store)
    trainer = trainer or Trainer.from_config(cfg)
    require_usable(cfg, store, trainer)
    return store, trainer


def _can_verify(cfg: Config, manifest: dict) -> bool:
    return (
        cfg.verify.enabled
        and bool(owner_hashes(manifest))
        and cfg.verify.q_source in ("clean", "control")
        and (cfg.paths.metrics / "original.json").is_file()
    )


def _n_test(cfg: Config) -> int:
    with np.load(cfg.paths.test, allow_pickle=False) as z:
        return len(z["y"])


def execute(
    cfg: Config, entry: dict, plan: dict | None = None, trainer: Trainer | None = None
) -> dict:
    """Compute and apply a journaled request, one planned sweep after the other.

    Each sweep is its own transaction (staged, applied, audited, versioned), named
    ``<request>-b<first block>``; the journal entry is finished with the last one. After a crash
    the request is planned again for the ids not yet forgotten, so finished sweeps are not redone.
    Returns the last sweep's record, with every sweep's record under ``sweeps``. ``trainer``:
    the drain's, built for the blocks as they are now: the first sweep reuses it; a later one
    builds its own, since an earlier sweep changed the blocks."""
    request_id, force = entry["request_id"], entry["force"]
    gone = Forgotten.of(cfg)
    ids = [i for i in entry["ids"] if i not in gone]  # a resumed request: the rest
    if not ids:  # every sweep landed before a crash: only the journal entry was left open
        txn.finish_request(txn.State.of(cfg), request_id)
        done = [r for r in read_records(cfg.paths.audit) if r["request_id"].startswith(request_id)]
        return {**done[-1], "sweeps": done}
    if plan is None or len(ids) < len(entry["ids"]):
        plan = plan_deletion(ids, cfg.paths.blocks, gone, force)
    tail = expected_tail(cfg)
    groups = plan_sweeps(plan, tail)
    if len(groups) == 1:
        compute(cfg, request_id, ids, force, plan, trainer=trainer)
        record = txn.apply(cfg, request_id)
        return {**record, "sweeps": [record]}
    outline = {"request": request_id, "expected_tail": tail,
               "sweeps": [sorted(g) for g in groups]}  # fmt: skip
    records = []
    for part, group in enumerate(groups, start=1):
        part_id = f"{request_id}-b{min(group)}"
        part_ids = [i for k in sorted(group) for i in group[k]]
        first = trainer if part == 1 else None  # later parts retrain changed blocks
        compute(cfg, part_id, part_ids, force, group, request_id, {**outline, "part": part}, first)
        records.append(txn.apply(cfg, part_id))
    return {**records[-1], "sweeps": records}


def recover(cfg: Config, refresh: bool = True) -> list[str]:
    """Finish the deletions a crash interrupted (under the writer lock), then refresh the
    metrics if any was finished; returns the finished request ids."""
    done = txn.recover(cfg, execute)
    if done and refresh:
        refresh_metrics(cfg, done[-1])
    return done


def validate(cfg: Config, ids: list[str], force: bool) -> tuple[dict[int, list[str]], Trainer]:
    """Everything a deletion checks before it journals anything, each failure one sentence: the
    request (unknown, repeated, forgotten or unsafe ids), a local and complete store trained on
    this device class with a model that builds here, an intact store and blocks (all of them,
    not only what the sweep reads, since the deletion versions the whole workspace with DVC and
    must not record a damaged file as the new version), and DVC stages it can commit. Returns
    the plan {block: ids} and the trainer it built, for the deletion to reuse."""
    require_local(cfg.paths.store)
    plan = plan_deletion(ids, cfg.paths.blocks, Forgotten.of(cfg), force)
    preflight(cfg)
    _, trainer = _usable_store(cfg)
    versioning.require_versionable(cfg, [cfg.paths.blocks, cfg.paths.store])
    return plan, trainer


@dataclass
class Drained:
    """What one drain did: deletions a crash had interrupted and it finished, the requests it
    finished (with those a killed drain left running), the ones it refused, and the record of
    the deletion it ran (``None`` if nothing was left to forget). Ids appear only as counts.
    ``seconds``: the wall time of its phases (checks: recovery to the journal; deletion:
    retraining to the git commit and the cache purge; refresh: the test metric and the verdict,
    versioned); ``committed_unix``: when its deletion was committed and versioned."""

    recovered: list[str] = field(default_factory=list)
    done: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    record: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    committed_unix: float | None = None


def drain(
    cfg: Config, request: str | None = None, refresh: bool = True, wait: float | None = None
) -> Drained:
    """Forget queued deletion requests: every one, or only ``request``. The one orchestration of
    a deletion: `obliviate forget` (which queues its ids and drains that request), `obliviate
    drain` and the scheduled deployment all run it, through the Prefect flow.

    Under the writer lock: finish what a crash interrupted, settle requests a killed drain left
    running, claim the queued requests, check everything a deletion needs (else one sentence and
    the requests stay queued; a direct forget withdraws its own, see ``forget``), mark
    them running, journal one deletion for their ids, execute it (one transaction per planned
    sweep), refresh the test metric and the verdict once, then mark them done. A failure's
    message names ids only by their keyed hash: it may end up in Prefect's database. ``wait``:
    how long to wait for another writer (None: as long as it takes, 0: not at all)."""
    require_local(cfg.paths.store)
    with txn.State.of(cfg).lock(wait):
        arm_kill_timer()  # the random-kill test's timed SIGKILL; nothing unless it is set
        out = _drain(cfg, request, refresh)
    crashpoint("after_unlock")  # a timed kill from here on comes after the deletion
    return out


def _drain(cfg: Config, request: str | None, refresh: bool) -> Drained:
    out, batch, trainer, clock = Drained(), None, None, time.perf_counter()
    try:
        inbox.preflight(cfg)
        out.recovered = recover(cfg, refresh=False)
        # requests a killed drain left running: requeued, refused, or (still running) landed
        settled = inbox.reconcile(cfg, finish_done=False)
        landed = [e for e in settled if e["status"] == "running"]
        out.refused = [e for e in settled if e["status"] == "refused"]
        batch = inbox.claim(cfg, only=request)
        out.refused += batch.refused
        if batch.ids:
            plan, trainer = validate(cfg, batch.ids, batch.force)
            deletion_id = txn.new_request_id()
            inbox.mark_running(cfg, batch, deletion_id)
            txn.journal_request(txn.State.of(cfg), deletion_id, batch.ids, batch.force)
            out.seconds["checks"], clock = time.perf_counter() - clock, time.perf_counter()
            out.record = execute(cfg, {"request_id": deletion_id, "ids": batch.ids,
                                       "force": batch.force}, plan, trainer)  # fmt: skip
            out.seconds["deletion"], clock = time.perf_counter() - clock, time.perf_counter()
            out.committed_unix = time.time()
    except ObliviateError as exc:  # its message may reach Prefect's database: no raw id
        ids = batch.ids if batch is not None else []
        raise type(exc)(redact(str(exc), ids, _existing_hasher(cfg))) from None
    # The metrics, then the requests: a request is done once its deletion and the metrics of
    # the new model are; killed in between, it stays running and the next drain (or the same
    # forget again) refreshes them and finishes it.
    finished = [*out.recovered, *(e["deletion"] for e in landed)]  # before this drain
    if refresh and (out.record is not None or finished):
        after = out.record["request_id"] if out.record else finished[-1]
        crashpoint("refresh_metrics")
        accuracy = refresh_metrics(cfg, after, trainer)["accuracy"]
        if out.record is not None:
            out.record["test_accuracy_after"] = accuracy
        out.seconds["refresh"] = time.perf_counter() - clock
    out.done = [inbox.finish(cfg, e, "done") for e in landed]
    out.done += inbox.mark_done(cfg, batch)  # incl. ids forgotten meanwhile
    return out


def _existing_hasher(cfg: Config) -> IdHasher | None:
    """The id hasher if its key exists, else None: a refused request creates no key file."""
    try:
        return IdHasher.existing(cfg)
    except ObliviateError:
        return None


def forget(
    cfg: Config,
    ids: list[str],
    force: bool = False,
    refresh: bool = True,
    wait: float | None = None,
) -> dict:
    """Forget samples by id now, in this process: queue them and drain that request (what
    `obliviate forget` does through the Prefect flow). Returns the deletion's audit record;
    ``report`` draws its plot."""
    request = inbox.submit(cfg, ids, force)
    with inbox.withdrawn_unless_claimed(cfg, request):
        out = drain(cfg, request, refresh, wait)
    entry = inbox.get(cfg, request)
    if entry["status"] == "refused":
        raise RequestError(entry["reason"])
    if out.record is None:  # its ids were forgotten by a deletion that recovery finished
        by = tuple(out.recovered or [entry.get("deletion") or ""])
        done = [r for r in read_records(cfg.paths.audit) if r["request_id"].startswith(by)]
        if not done:
            raise RequestError("the samples were already forgotten by an earlier deletion.")
        return {**done[-1], "sweeps": done}
    return out.record


def report(cfg: Config, record: dict) -> Path | None:
    """The deletion's residual-memory plot (reports/<request>.png), drawn from its audit record
    after the commit: it is evidence for people, not part of the deletion. None when nothing was
    retrained (only validation samples left)."""
    if not record["deltas"]:
        return None
    return plot_deltas(
        record, cfg.forget.epsilon, cfg.paths.reports / f"{record['request_id']}.png"
    )
