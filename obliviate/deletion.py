"""Deletion requests served: ``drain`` is the one orchestration, ``forget`` queues ids and drains
them now. The CLI, the Prefect flows (flows/deletion.py) and in-process callers (benchmarks,
tests) all run these, and only print what they return.

``drain`` is a straight script, under the writer lock, that runs each step once:

1. recover: apply what a crash left committed; finish the requests a killed drain left running
   (``obliviate.lifecycle``'s journal says which, and which of their ids are left);
2. claim the queued requests (each with the plan made when it was validated);
3. check the workspace once: integrity (``fsck.preflight``), the store and model fit
   (``compat.require_usable``), the DVC stages it will commit;
4. mark the requests running, then per planned sweep: retrain, stitch and judge
   (``obliviate.sweep``, ``obliviate.guard``), stage (the commit point: the requests are
   committed after the last sweep's), apply (``obliviate.transaction``);
5. mark the requests done: the deletion is versioned and purged;
6. pay the metric refresh the journal owes (test accuracy and verdict of the served model,
   versioned): a separate step, which no request waits for.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from obliviate import lifecycle, versioning
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
from obliviate.store import ParamStore, frontier_after
from obliviate.sweep import sweep
from obliviate.train import Trainer
from obliviate.verify import verify


@dataclass
class Drained:
    """What one drain did. ``recovered``: what it finished after a crash (staged transactions
    applied, then deletions whose requests a killed drain left unfinished); ``done`` and
    ``refused``: the requests it finished (ids only as keyed hashes); ``record``: the audit
    record of the deletion it ran, with every planned sweep's under ``sweeps`` (None if nothing
    was left to forget); ``accuracy``: the served model's test accuracy if it refreshed the
    metrics; ``seconds``: wall time by phase (checks: recovery to the journal; deletion:
    retraining to the git commit and the purge; refresh: the metrics, versioned);
    ``committed_unix``: when its deletion was applied and versioned; ``consolidation_due``:
    the consolidation trigger that fired after it (the flows check it:
    ``tasks.consolidation.start_if_due``)."""

    recovered: list[str] = field(default_factory=list)
    done: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    record: dict | None = None
    accuracy: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    committed_unix: float | None = None
    consolidation_due: str | None = None  # the trigger that fired after it (the flow's check)


# --------------------------------------------------------------------------- the drain


def drain(
    cfg: Config, request: str | None = None, refresh: bool = True, wait: float | None = None
) -> Drained:
    """Forget the queued requests: every one, or only ``request`` (and those its ids cover).
    ``refresh``: pay a metric refresh owed (else it stays owed); ``wait``: seconds to wait for
    another writer (None: as long as it takes, 0: not at all). A failure's message names ids
    only by keyed hash: it may end up in Prefect's database."""
    require_local(cfg.paths.store)
    with txn.State.of(cfg).lock(wait):
        arm_kill_timer()  # the random-kill test's timed SIGKILL; nothing unless it is set
        out = _drain(cfg, request, refresh)
    crashpoint("after_unlock")  # a timed kill from here on comes after the deletion
    return out


def _drain(cfg: Config, only: str | None, refresh: bool) -> Drained:
    out, batch, trainer, clock = Drained(), None, None, time.perf_counter()
    try:
        lifecycle.migrate(cfg)
        out.recovered, out.done = recover(cfg)
        batch = lifecycle.claim(cfg, only)
        out.refused = batch.refused
        if batch.ids:
            store, trainer = checks(cfg)
            deletion_id = txn.new_deletion_id()
            lifecycle.start(cfg, batch, deletion_id)
            crashpoint("after_claim")
            out.seconds["checks"], clock = time.perf_counter() - clock, time.perf_counter()
            out.record = execute(cfg, deletion_id, batch.plan, store, trainer)
            out.committed_unix = time.time()
            out.done += lifecycle.finish_deletion(cfg, deletion_id, "done")
            out.seconds["deletion"], clock = time.perf_counter() - clock, time.perf_counter()
        # accepted with nothing left to forget: their ids were forgotten meanwhile
        out.done += [lifecycle.finish(cfg, e, "done") for e in batch.accepted
                     if e["status"] == "queued"]  # fmt: skip
    except ObliviateError as exc:  # its message may reach Prefect's database: no raw id
        ids = batch.ids if batch is not None else []
        raise type(exc)(redact(str(exc), ids, _existing_hasher(cfg))) from None
    if refresh and lifecycle.refresh_owed(cfg):
        out.accuracy = pay_refresh(cfg, trainer)
        if out.record is not None:
            out.record["test_accuracy_after"] = out.accuracy
        out.seconds["refresh"] = time.perf_counter() - clock
    return out


def pay_refresh(cfg: Config, trainer: Trainer | None = None) -> float | None:
    """Refresh the metrics the journal owes a refresh of (under the writer lock); returns the
    served model's test accuracy, or None when the refresh failed (it stays owed, with why)."""
    owed = lifecycle.refresh_owed(cfg)
    if owed is None:
        return None
    crashpoint("refresh_metrics")
    refreshed = refresh_metrics(cfg, owed["after"], trainer)
    lifecycle.refresh_paid(cfg, owed, refreshed.get("stale"))
    return refreshed["accuracy"]


def checks(cfg: Config) -> tuple[ParamStore, Trainer]:
    """Everything a deletion needs of the workspace, checked once before it changes anything,
    each failure one sentence: intact store and blocks (all of them, not only what the sweep
    reads: the deletion versions the whole workspace with DVC and must not record a damaged
    file as the new version), a store that fits today's params, blocks, model and device class,
    and DVC stages it can commit. Returns the store and the trainer it built, for the deletion
    to use."""
    preflight(cfg)
    store = ParamStore.open(cfg.paths.store)
    trainer = Trainer.from_config(cfg)
    require_usable(cfg, store, trainer)
    versioning.require_versionable(cfg, [cfg.paths.blocks, cfg.paths.store])
    return store, trainer


def recover(cfg: Config) -> tuple[list[str], list[dict]]:
    """Finish what a crash interrupted (under the writer lock): apply the committed
    transactions, then finish each deletion whose requests a killed drain left running or
    committed, from the ids the audit does not list yet. Returns what it finished: the
    transactions applied, then the deletions; and the requests it finished."""
    done, requests_done = txn.recover(cfg), []
    for deletion_id, requests in lifecycle.unfinished(cfg).items():
        gone = Forgotten.of(cfg)
        left = [i for e in requests for i in e["ids"] if i not in gone]
        if left:
            force = any(e["force"] for e in requests)
            try:
                plan = plan_deletion(left, cfg.paths.blocks, gone, force)
            except RequestError as exc:  # became invalid meanwhile: final, not retried
                lifecycle.finish_deletion(cfg, deletion_id, "refused", str(exc))
                continue
            store = ParamStore.open(cfg.paths.store)
            trainer = Trainer.from_config(cfg)
            require_usable(cfg, store, trainer)  # else they stay running until it is fixed
            execute(cfg, deletion_id, plan, store, trainer)
        requests_done += lifecycle.finish_deletion(cfg, deletion_id, "done")
        if deletion_id not in done:  # (its one transaction, applied above, has its name)
            done.append(deletion_id)
    return done, requests_done


# --------------------------------------------------------------------------- one deletion


def execute(
    cfg: Config, deletion_id: str, plan: dict[int, list[str]], store: ParamStore, trainer
) -> dict:
    """Forget ``plan``'s ids ({block: ids}) for the running requests of ``deletion_id``, one
    planned sweep after the other, each its own transaction (staged, applied, audited,
    versioned), named ``<deletion>-b<first block>`` when there are several. The requests are
    committed once the last one is staged. Returns the last sweep's record, with every sweep's
    under ``sweeps``.

    A user error on the way (a damaged block found mid-sweep, a model that no longer builds)
    refuses the requests, with the reason and the ids redacted, and drops the staging folder:
    recovery does not retry it forever."""
    tail = expected_tail(cfg)
    groups = plan_sweeps(plan, tail)
    outline = {"request": deletion_id, "expected_tail": tail,
               "sweeps": [sorted(g) for g in groups]}  # fmt: skip
    records = []
    for part, group in enumerate(groups, start=1):
        txn_id = deletion_id if len(groups) == 1 else f"{deletion_id}-b{min(group)}"
        sweep_plan = None if len(groups) == 1 else {**outline, "part": part}
        if part > 1:  # an earlier sweep changed the blocks and the store's fingerprint
            store = ParamStore.open(cfg.paths.store)
            require_usable(cfg, store, trainer)
        try:
            compute(cfg, txn_id, group, store, trainer, sweep_plan)
        except ObliviateError as exc:
            lifecycle.finish_deletion(cfg, deletion_id, "refused", str(exc))
            shutil.rmtree(txn.State.of(cfg).staging / f".tmp-{txn_id}", ignore_errors=True)
            raise
        if part == len(groups):
            lifecycle.commit(cfg, deletion_id)
        records.append(txn.apply(cfg, txn_id))
    crashpoint("before_done")
    return {**records[-1], "deletion": deletion_id, "sweeps": records}


def compute(
    cfg: Config,
    txn_id: str,
    plan: dict[int, list[str]],
    store: ParamStore,
    trainer: Trainer,
    sweep_plan: dict | None = None,
) -> dict:
    """Retrain, stitch, judge and stage one sweep (nothing visible changes until ``apply``).

    M' is evaluated once, on the validation split, by the accuracy guard; that evaluation is
    the audit record's accuracy. The test-set metric comes with the metric refresh."""
    start = time.time()
    guard = Guard(cfg, trainer, store, exclude=plan.get(0, []))  # never judge on what leaves
    before = store.read_params(store.n_blocks)
    manifest = read_manifest(cfg.paths.blocks)
    staging = txn.begin(cfg, txn_id, store)
    training = {k: v for k, v in plan.items() if k > 0}  # block 0, validation: never trained on
    result = None
    if training:
        judge = guard.judge if guard.enabled else None
        crashpoint("before_retrain")
        extend = cfg.forget.on_refusal == "extend"
        result = sweep(trainer, store, training, stop_rule(cfg), judge, staging.put, extend)
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
    rewritten = rows + (result.unshift if result else [])  # a baked-in shift rewrites a row
    superseded = [
        file_digest(f, "md5") for f in txn.superseded_files(cfg, store, sorted(plan), rewritten)
    ]
    ids = [i for k in sorted(plan) for i in plan[k]]
    retrained = range(rows[0], rows[-1] + 1) if rows else range(0)
    exact = frontier_after(store.exact_through, retrained, store.exact_replay)
    record = {
        "request_id": txn_id,
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
        # the tiers: exact (bit-identical to a naive retrain) or approximate until consolidated
        "tier": "exact" if exact == store.n_blocks else "approximate",
        "stitched_at": result.t if result is not None and result.shift is not None else None,
        "exact_through": exact,
        "made_exact": [a["deletion"] for a in store.approximate] if exact == store.n_blocks else [],
        # forget.on_refusal: consolidate served a stitch the guard refused: consolidate now
        "guard_refused_committed": bool(
            result is not None and result.verdict is not None and not result.verdict.accepted
        ),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "new_blocks": new_blocks,  # staged as files, not kept in the record
    }
    return txn.stage(cfg, staging, txn_id, result, record, superseded, dropped_slots)


def _nothing_retrained() -> dict:
    """The sweep summary of a request whose samples are all in the validation split."""
    return {"first_block": None, "last_affected_block": None, "stop_block": None, "t": 0,
            "retrained_blocks": 0, "reason": "validation_only", "guard_rejections": 0,
            "deltas": [], "fits": []}  # fmt: skip


def stop_rule(cfg: Config) -> StopRule:
    f = cfg.forget
    return StopRule(f.epsilon, f.min_blocks, f.max_blocks, f.method)


def expected_tail(cfg: Config) -> int:
    """Blocks a sweep is expected to retrain after its last affected block: the median over the
    last 20 deletions, or forget.min_blocks before there are any."""
    deletions = [r for r in read_records(cfg.paths.audit) if r.get("last_affected_block")]
    tails = [r["stop_block"] - r["last_affected_block"] + 1 for r in deletions[-20:]]
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


# --------------------------------------------------------------------------- the metric refresh


def refresh_metrics(cfg: Config, after: str, trainer: Trainer | None = None) -> dict:
    """The served model's test accuracy (metrics/evaluate.json) and, where the verifying owner
    can be judged, the backdoor gate (metrics/verify.json, else marked stale), versioned as
    their DVC stages. A failure is returned (``stale``: its sentence), not raised: the deletion
    it follows is done. ``trainer``: one already built for this model, to evaluate with."""
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


def _existing_hasher(cfg: Config) -> IdHasher | None:
    """The id hasher if its key exists, else None: a refused request creates no key file."""
    try:
        return IdHasher.existing(cfg)
    except ObliviateError:
        return None


# --------------------------------------------------------------------------- forget


def forget(
    cfg: Config,
    ids: list[str],
    force: bool = False,
    refresh: bool = True,
    wait: float | None = None,
    drain_with: Callable[[str, float | None], Drained] | None = None,
) -> dict:
    """Forget samples by id now: queue them (``lifecycle.submit`` validates them, naming bad
    ids in one sentence, and writes nothing then) and drain that request. ``drain_with(request,
    wait)`` runs the drain (the CLI: through the Prefect flow; default: ``drain`` in this
    process). Returns the audit record of the deletion that forgot them, with every sweep's
    under ``sweeps``: this drain's, or, for a request a killed drain had left unfinished (which
    a retried forget joins), the one that recovery finished."""
    request = lifecycle.submit(cfg, ids, force)
    run = drain_with or (lambda request, wait: drain(cfg, request, refresh, wait))
    with lifecycle.withdrawn_unless_claimed(cfg, request):
        out = run(request, wait)
    entry = lifecycle.get(cfg, request)
    if entry["status"] == "refused":
        raise RequestError(entry["reason"])
    if out.record is not None and entry.get("deletion") == out.record["deletion"]:
        return {**out.record, "consolidation_due": out.consolidation_due}
    by = entry.get("deletion") or ""
    sweeps = [r for r in read_records(cfg.paths.audit) if r["request_id"].startswith(by)]
    if not by.startswith("del-") or not sweeps:
        raise RequestError("the samples were already forgotten by an earlier deletion.")
    return {**sweeps[-1], "sweeps": sweeps, "deletion": by, "test_accuracy_after": out.accuracy,
            "consolidation_due": out.consolidation_due}  # fmt: skip


def report(cfg: Config, record: dict) -> Path | None:
    """The deletion's residual-memory plot (reports/<request>.png), drawn from its audit record
    after the commit: it is evidence for people, not part of the deletion. None when nothing was
    retrained (only validation samples left)."""
    if not record["deltas"]:
        return None
    return plot_deltas(
        record, cfg.forget.epsilon, cfg.paths.reports / f"{record['request_id']}.png"
    )
