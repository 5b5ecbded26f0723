"""Consolidation: retrain the store from its first inexact row to B on the current blocks, so
that every row is exact again and the served model P_B is the naive model, bit for bit.

A deletion is committed in seconds with a stitched M' and shifted rows: it is *approximate*
(``ParamStore.exact_through`` says how far the store is still exact). A consolidation makes
every approximate deletion *exact*: it trains rows K+1..B from the exact row K, as stored
training would on the blocks as they are now, and installs them.

    <state>/consolidation/        the work under way, resumable: rows.zarr (laid out like the
                                  store) and work.json (which rows, the blocks they trained on,
                                  their hashes, the consolidated model's reference)
    <state>/consolidation.lock    one consolidation at a time

It computes without the writer lock, so deletions go on meanwhile. Each computed row k
remembers the chain of the blocks 1..k it depends on (a running sha256 of their sha256s in the
manifest). Under the writer lock it compares that chain with the manifest's: a deletion
meanwhile rewrote a block, and every row from that block on is computed again, outside the lock,
from the exact row before it (the live store's or its own), up to ``consolidate.rounds`` times.
Once its rows all fit it stages them as one transaction (the commit point) and applies it the
way a deletion is applied (``obliviate.transaction``): rows renamed in, shifts dropped, the
guard's reference moved to the consolidated model, an audit record (the deletions made exact,
every row's hash and the chain an auditor replays, ``obliviate.replay``), one DVC/git version,
the superseded chunks purged. It never installs a row trained on a block that has changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from obliviate import lifecycle
from obliviate import transaction as txn
from obliviate.audit import read_records
from obliviate.compat import require_usable
from obliviate.config import Config
from obliviate.errors import ObliviateError
from obliviate.faults import arm_kill_timer, crashpoint
from obliviate.guard import reference_of
from obliviate.hashing import file_digest, model_hash, row_hash
from obliviate.partition import read_manifest
from obliviate.rows import Rows
from obliviate.store import ARRAY_CONFIG, ParamStore
from obliviate.train import Trainer

WORK = "consolidation"


class ConsolidationError(ObliviateError):
    """A consolidation cannot run now (another runs, or it could not catch up)."""


# --------------------------------------------------------------------------- what is due


@dataclass(frozen=True)
class Exactness:
    """How far the store is exact, and what waits for a consolidation."""

    exact_through: int
    n_blocks: int
    pending: list[dict]  # the approximate deletions, oldest first (ParamStore.approximate)
    drift: float | None  # reference accuracy minus the served model's, on the validation split

    @classmethod
    def of(cls, cfg: Config, store: ParamStore | None = None) -> Exactness:
        store = store or ParamStore.open(cfg.paths.store)
        last = None
        for r in read_records(cfg.paths.audit):
            if r.get("kind") == "consolidation" and not r.get("partial"):
                last = None
            elif r.get("guard"):
                last = r["guard"]
        drift = None if last is None else last["reference_accuracy"] - last["accuracy"]
        return cls(store.exact_through, store.n_blocks, store.approximate, drift)

    @property
    def exact(self) -> bool:
        return self.exact_through == self.n_blocks

    def oldest_age(self, now: float | None = None) -> float | None:
        if not self.pending:
            return None
        return (now or time.time()) - self.pending[0]["committed"]

    def describe(self, cfg: Config) -> str:
        """One line for `obliviate status` and `info`."""
        if self.exact:
            return f"exact through row {self.n_blocks} of {self.n_blocks}: no deletion pending"
        age = self.oldest_age()
        late = age is not None and age > cfg.consolidate.max_age_s
        oldest = "" if age is None else f", the oldest {age / 3600:.1f} h old"
        deadline = f" (past consolidate.max_age {cfg.consolidate.max_age})" if late else ""
        return (
            f"exact through row {self.exact_through} of {self.n_blocks}; "
            f"{len(self.pending)} approximate deletion(s) pending{oldest}{deadline}; run "
            "`obliviate consolidate`"
        )


def due(cfg: Config, store: ParamStore | None = None) -> str | None:
    """The trigger that makes a consolidation due now, as a sentence, or None: a refused
    stitch committed under forget.on_refusal: consolidate, too many approximate deletions, the
    served model drifted on the validation split, or the oldest approximate deletion halfway to
    the deadline (consolidate.max_age: the other half is for the consolidation itself)."""
    state = Exactness.of(cfg, store)
    if state.exact:
        return None
    c = cfg.consolidate
    since = []  # the records since the last consolidation
    for r in read_records(cfg.paths.audit):
        full = r.get("kind") == "consolidation" and not r.get("partial")
        since = [] if full else [*since, r]
    if any(r.get("guard_refused_committed") for r in since):
        return "a refused stitch was committed (forget.on_refusal: consolidate)"
    if c.max_pending is not None and len(state.pending) >= c.max_pending:
        return f"{len(state.pending)} approximate deletions pending (max_pending {c.max_pending})"
    if c.max_drift is not None and state.drift is not None and state.drift >= c.max_drift:
        return (
            f"validation accuracy {state.drift:.4f} under the reference (max_drift {c.max_drift})"
        )
    age = state.oldest_age()
    if age is not None and age >= c.max_age_s / 2:
        return f"an approximate deletion is {age / 3600:.1f} h old (max_age {c.max_age})"
    return None


# --------------------------------------------------------------------------- the work


def chains(manifest: dict) -> list[str]:
    """c_0 .. c_B: c_k hashes the sha256 of blocks 1..k, so row k depends on c_k alone."""
    out, c = [], hashlib.sha256(b"obliviate blocks").hexdigest()
    out.append(c)
    for b in manifest["blocks"]:
        c = hashlib.sha256((c + b["sha256"]).encode()).hexdigest()
        out.append(c)
    return out


@dataclass
class Work:
    """The consolidation's work folder: rows computed so far (a Zarr group like the store's),
    each with the block chain it was trained on and its hash."""

    folder: Path
    params: str  # the store's params fingerprint: work for other params is dropped
    rows: dict[int, dict] = field(default_factory=dict)  # k -> {"chain", "hash"}
    hashes: dict[int, dict] = field(default_factory=dict)  # live rows k <= K: {"chain", "hash"}
    reference: dict | None = None  # the guard's reference for the work's P_B, by its hash
    finished: str | None = None  # P_B's hash once the hashes and the reference are done for it

    @classmethod
    def open(cls, cfg: Config, store: ParamStore) -> Work:
        folder = cfg.paths.state / WORK
        params = store.meta["fingerprint"].split(":")[0]
        with contextlib.suppress(OSError, ValueError, KeyError):
            state = json.loads((folder / "work.json").read_text())
            if state["params"] == params and (folder / "rows.zarr").is_dir():
                return cls(folder, params, {int(k): v for k, v in state["rows"].items()},
                           {int(k): v for k, v in state["hashes"].items()},
                           state.get("reference"), state.get("finished"))  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        store.staging_arrays(folder / "rows.zarr")
        return cls(folder, params)

    def arrays(self) -> dict:
        import zarr

        group = zarr.open_group(str(self.folder / "rows.zarr"), mode="r+")
        return {name: arr.with_config(ARRAY_CONFIG) for name, arr in group.arrays()}

    def save(self) -> None:
        state = {"params": self.params, "rows": self.rows, "hashes": self.hashes,
                 "reference": self.reference, "finished": self.finished}  # fmt: skip
        txn.write_json_atomic(self.folder / "work.json", state)

    def valid_through(self, chain: list[str]) -> int | None:
        """The last row of the contiguous run of computed rows whose blocks are unchanged."""
        last = None
        for k in sorted(self.rows):
            if self.rows[k]["chain"] != chain[k] or (last is not None and k != last + 1):
                break
            last = k
        return last

    def read(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        arrays = self.arrays()
        opt = arrays["optimizer"][k] if "optimizer" in arrays else None
        return arrays["params"][k], opt

    def drop(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def _one_at_a_time(cfg: Config) -> Iterator[None]:
    from filelock import FileLock, Timeout

    cfg.paths.state.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cfg.paths.state / "consolidation.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConsolidationError(
            "another consolidation of this workspace is running; wait for it to finish (it "
            "makes every deletion exact that this one would)."
        ) from None
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------- consolidate


@dataclass
class Consolidated:
    """What one consolidation did: its audit record (None when every row was exact already),
    how many computations it took and the seconds by phase."""

    record: dict | None
    rounds: int = 0  # computations before the last install (1: no deletion got in the way)
    seconds: dict[str, float] = field(default_factory=dict)
    partial: list[str] = field(default_factory=list)  # installs of an exact prefix on the way
    stalls: int = 0  # catch-up rounds in a row that found nothing left to install


def consolidate(cfg: Config, trainer: Trainer | None = None, wait: float | None = None):
    """Make every row of the store exact (see the module docstring). ``wait``: seconds to wait
    for the writer lock each time it is needed (None: as long as it takes).

    Under torchrun every rank trains (the store's own number of processes: replay is exact for
    that number only); rank 0 alone plans, writes the work and installs it."""
    trainer = trainer or Trainer.from_config(cfg)
    par = trainer.parallel
    arm_kill_timer()  # the random-kill test's timed SIGKILL; nothing unless it is set
    with _one_at_a_time(cfg) if par.rank == 0 else contextlib.nullcontext():
        out, clock, work = Consolidated(None), time.perf_counter(), None
        for attempt in itertools.count():  # 0: the first computation; then the catch-ups
            step = None
            if par.rank == 0:
                try:
                    step, work = _step(cfg, trainer, out, attempt, wait, clock)
                except ObliviateError as exc:
                    step = {"do": "error", "why": str(exc), "kind": type(exc).__name__}
            step = par.share(step)  # rank 0's decision, on every rank
            if step["do"] == "error":
                raise ConsolidationError(step["why"])
            if step["do"] == "return":
                return out
            _compute(cfg, trainer, work, step)


def _step(cfg, trainer, out: Consolidated, attempt: int, wait, clock: float):
    """Rank 0, under the writer lock: install what the work holds that still fits (every row:
    done; a prefix: the store is exact further), then say what to compute next."""
    with txn.State.of(cfg).lock(wait):
        txn.recover(cfg)  # a crash left a transaction staged: the store must be whole
        store = ParamStore.open(cfg.paths.store)
        require_usable(cfg, store, trainer)
        size = store.meta["extra"].get("parallel_size", 1)
        if size != trainer.parallel.size:
            raise ConsolidationError(
                f"{store.path} was trained by {size} process(es) and replay is exact only with "
                f"as many; consolidate with `torchrun --nproc-per-node {size} -m "
                "obliviate.distributed --consolidate`."
            )
        work = Work.open(cfg, store)
        chain = chains(read_manifest(cfg.paths.blocks))
        n, k_live = store.n_blocks, store.exact_through
        if k_live == n:  # every row exact (already, or a deletion retrained to the end)
            work.drop()
            return {"do": "return"}, work
        valid = work.valid_through(chain)
        if valid == n and work.finished != work.rows[n]["hash"]:  # killed before its hashes
            step = {"do": "compute", "start": n + 1, "base": (None, None), "chain": chain, "n": n}
            return step, work  # (and reference were done: finish them, outside the lock)
        if valid is not None and valid > k_live and min(work.rows) <= k_live + 1:
            out.rounds, out.stalls = attempt, 0
            record = _install(cfg, store, trainer, work, chain, out, valid, clock)
            if valid == n:
                out.record = record
                out.seconds["install"] = time.perf_counter() - clock - out.seconds["compute"]
                return {"do": "return"}, work
            out.partial.append(record["request_id"])
            store = ParamStore.open(cfg.paths.store)  # exact through ``valid`` now
            work = Work.open(cfg, store)
        elif attempt > 0:  # deletions changed a block before any row it computed: no progress
            out.stalls += 1
            if out.stalls > cfg.consolidate.rounds:
                raise ConsolidationError(
                    f"deletions kept changing blocks just after row {k_live} through "
                    f"{cfg.consolidate.rounds} catch-up rounds in a row; run `obliviate "
                    "consolidate` again when the requests have settled (or raise "
                    "consolidate.rounds)."
                )
        start, base = _restart(store, work, chain, Rows(store, trainer))
    step = {"do": "compute", "start": start, "base": base, "chain": chain, "n": store.n_blocks}
    return step, work


def _restart(store: ParamStore, work: Work, chain: list[str], rows: Rows):
    """An empty work whose base is the live store's exact row K: (K + 1, (P_K, its state));
    ``rows`` replays P_K where a thinned store does not keep it."""
    k_live = store.exact_through
    shutil.rmtree(work.folder / "rows.zarr", ignore_errors=True)
    store.staging_arrays(work.folder / "rows.zarr")
    arrays = work.arrays()
    work.rows = {}
    theta, opt = rows.read(k_live)
    arrays["params"][k_live] = theta
    if opt is not None:
        arrays["optimizer"][k_live] = opt
    work.rows[k_live] = {"chain": chain[k_live], "hash": row_hash(theta, opt)}
    work.save()
    return k_live + 1, (theta, opt)


def _compute(cfg, trainer, work: Work | None, step: dict) -> None:
    """Rows start..B from the base row (start - 1) on the blocks as they are, into the work
    (rank 0's; None on the other ranks, which only train); then the hashes of the live exact
    rows and the consolidated model's reference."""
    (theta, opt), chain, n = step["base"], step["chain"], step["n"]
    arrays = None if work is None else work.arrays()
    live = None if work is None else ParamStore.open(cfg.paths.store)
    for k in range(step["start"], n + 1):
        theta, opt = trainer.run_block(k, theta, opt)
        theta, opt = theta.numpy(), None if opt is None else opt.numpy()
        crashpoint("during_consolidation")
        if work is None:
            continue
        if live.is_kept(k):  # train.store_every: the rows between are not stored
            arrays["params"][k] = theta
            if opt is not None:
                arrays["optimizer"][k] = opt
        work.rows[k] = {"chain": chain[k], "hash": row_hash(theta, opt)}
        if k % 16 == 0 or k == n:
            work.save()
    if work is None:
        return
    store = ParamStore.open(cfg.paths.store)
    for k in range(min(work.rows)):  # the live rows before the work's: exact, hashed once
        if work.hashes.get(k, {}).get("chain") != chain[k]:  # (a thinned store: kept rows)
            hashed = row_hash(*store.read(k)) if store.is_kept(k) else None
            work.hashes[k] = {"chain": chain[k], "hash": hashed}
    served = work.rows[n]["hash"]
    if (work.reference or {}).get("row_hash") != served:
        ref = reference_of(cfg, trainer, work.read(n)[0])
        work.reference = None if ref is None else {**ref, "row_hash": served}
    work.finished = served
    work.save()


def _install(
    cfg, store: ParamStore, trainer, work: Work, chain, out, upto: int, clock: float
) -> dict:
    """Under the writer lock, the work's rows K+1..``upto`` fitting the blocks as they are:
    stage them as one transaction (the commit point), then apply it. ``upto`` B: the store is
    exact, every approximate deletion too, and the record holds the hash chain; a prefix
    (deletions meanwhile changed a later block): the store is exact through ``upto``, the
    served model unchanged until the rest is installed."""
    n, k_live, full = store.n_blocks, store.exact_through, upto == store.n_blocks
    txn_id = f"con-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    state = txn.State.of(cfg)
    before = store.read_params(n)
    after = work.read(n)[0] if full else before
    tmp = state.staging / f".tmp-{txn_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.move(str(work.folder / "rows.zarr"), tmp / "rows.zarr")
    installed = {str(k) for k in range(k_live + 1, upto + 1) if store.is_kept(k, pinned=not full)}
    for name in ("params", "optimizer"):  # only rows K+1..upto are installed
        chunks = tmp / "rows.zarr" / name / "c"
        for row in list(chunks.iterdir()) if chunks.is_dir() else []:
            if row.name not in installed:
                shutil.rmtree(row)
    # a row pinned by a deletion while the work was computed (it baked a shift in) is exact now,
    # and the work, which did not keep it, has its exact value only by replay: unpin it
    unpin = [
        k
        for k in store.meta.get("pinned", [])
        if k_live < k <= upto and not (tmp / "rows.zarr" / "params" / "c" / str(k)).is_dir()
    ]
    pins = []
    if not full and upto + 1 < n and not store.is_kept(upto + 1):
        # the shifted rows after a prefix replay from an unchanged row: keep row upto + 1 as is
        theta, opt = Rows(store, trainer).raw(upto + 1)
        group = zarr.open_group(str(tmp / "rows.zarr"), mode="r+")
        group["params"][upto + 1] = theta
        if opt is not None:
            group["optimizer"][upto + 1] = opt
        pins = [upto + 1]
    superseded = store.files_for_rows(list(range(k_live + 1, upto + 1)))  # (unpinned rows too)
    if full:  # the shifts go too: derived from rows trained with the deleted samples
        superseded += sorted(p for p in (store.path / "shifts").rglob("*") if p.is_file())
        superseded += store.files_for_rows(store.meta.get("pinned", []))  # and the pins
    if full:
        out.seconds["compute"] = time.perf_counter() - clock
    record = {
        "request_id": txn_id,
        "kind": "consolidation",
        "partial": not full,
        "sample_id_hashes": [],
        "first_block": k_live + 1,
        "stop_block": upto,
        "retrained_blocks": upto - k_live,
        "exact_deletions": [a["deletion"] for a in store.approximate] if full else [],
        "model_before": model_hash(before),
        "model_after": model_hash(after),
        "rounds": out.rounds,
        "timings_s": {"compute": time.perf_counter() - clock},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    reference = None
    if full:
        hashes = [(work.hashes.get(k) or work.rows[k])["hash"] for k in range(n + 1)]
        blocks = [b["sha256"] for b in read_manifest(cfg.paths.blocks)["blocks"]]
        record["chain"] = {"rows": hashes, "blocks": blocks, "head": chain_head(hashes, blocks)}
        if work.reference is not None:
            reference = _present_slots(cfg, {k: v for k, v in work.reference.items()
                                             if k != "row_hash"})  # fmt: skip
    staged = {
        "request_id": txn_id,
        "kind": "consolidation",
        "rows": [k_live + 1, upto + 1],
        "reference": reference,
        "pins": pins,
        "unpin": unpin,
        "record": record,
        "superseded_md5": [file_digest(f, "md5") for f in superseded],
    }
    txn.write_json_atomic(tmp / "txn.json", staged)
    if full:
        lifecycle.owe_refresh(cfg, txn_id)  # the served model changes: its metrics are owed
    crashpoint("before_consolidation_commit")
    os.replace(tmp, state.staging / txn_id)  # <- commit point
    work.drop()
    return txn.apply(cfg, txn_id)


def chain_head(row_hashes: list[str], block_hashes: list[str]) -> str:
    """One hash over P_0, block 1, P_1, block 2, ..., P_B: changing any row or block changes it."""
    h = hashlib.sha256(str(row_hashes[0]).encode())
    for block, row in zip(block_hashes, row_hashes[1:], strict=True):  # None: a row a thinned
        h.update(block.encode())  # store does not keep (train.store_every)
        h.update(str(row).encode())
    return h.hexdigest()


def _present_slots(cfg: Config, reference: dict) -> dict:
    """The reference with the predictions of validation samples deleted meanwhile dropped."""
    from obliviate.partition import load_block

    if "validation" not in read_manifest(cfg.paths.blocks):
        return reference
    present = set(load_block(cfg.paths.blocks, 0).slot.tolist())
    preds = [p if i in present else -1 for i, p in enumerate(reference["val_predictions"])]
    return {**reference, "val_predictions": preds}


# --------------------------------------------------------------------------- entry points


def run(cfg: Config, if_due: bool = False, wait: float | None = None) -> dict:
    """`obliviate consolidate`: consolidate now (or, ``if_due``, only when a trigger fires),
    then pay the metric refresh owed (its own, or one a crash left owed). Returns what
    happened, with a sentence."""
    from obliviate.deletion import pay_refresh

    with txn.State.of(cfg).lock(wait):
        recovered = txn.recover(cfg)  # what a crash left staged: the store must be whole
    state = Exactness.of(cfg)
    reason = due(cfg)
    out = None
    if not state.exact and not (if_due and reason is None):
        out = consolidate(cfg, wait=wait)
    with txn.State.of(cfg).lock(wait):
        accuracy = pay_refresh(cfg)
    if out is None or out.record is None:
        said = "every row is exact already" if out is not None or state.exact else (
            f"not due; {state.describe(cfg)}")  # fmt: skip
        if recovered:
            said += f" (finished after a crash: {', '.join(recovered)})"
        return {"record": None, "accuracy": accuracy, "sentence": f"consolidate: {said}"}
    r = out.record
    tested = "" if accuracy is None else f"; test accuracy {accuracy:.4f}"
    why = "" if reason is None else f" ({reason})"
    return {
        "record": r,
        "rounds": out.rounds,
        "seconds": out.seconds,
        "accuracy": accuracy,
        "sentence": (
            f"consolidated{why}: retrained blocks {r['first_block']}..{r['stop_block']} in "
            f"{sum(out.seconds.values()):.1f} s; {len(r['exact_deletions'])} deletion(s) now "
            f"exact; served model sha256 {r['model_after'][:12]}{tested}"
        ),
    }


def exact_at(records: list[dict]) -> dict[str, str]:
    """Deletion id -> when (and by what) it became exact: by itself (it retrained to the end
    from an exact row), by a later deletion that did, or by a consolidation. A deletion not in
    the map is still approximate."""
    out: dict[str, str] = {}
    for i, r in enumerate(records):
        full = r.get("kind") == "consolidation" and not r.get("partial")
        makes_exact = full or r.get("tier") == "exact"
        if not makes_exact:
            continue
        by = "itself" if r.get("kind") != "consolidation" else r["request_id"]
        for earlier in records[: i + 1]:
            if earlier.get("kind") != "consolidation" and earlier["request_id"] not in out:
                who = "itself" if earlier is r else by if by != "itself" else r["request_id"]
                out[earlier["request_id"]] = f"{r['finished_at']} ({who})"
    return out
