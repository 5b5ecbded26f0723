"""Crash-safe deletions: a request journal, a staged redo record, and an idempotent apply.

    <state>/requests/<id>.json   the accepted request (ids), until it is done
    <state>/staging/<id>/        everything the deletion will write, complete before it counts
    <state>/writer.lock          one writer at a time (an OS file lock: a killed holder frees it)
    <state>/writer.holder.json   who holds it (pid, command, since), for the one waiting
    <state>/remote_purge.json    superseded objects still to delete from the DVC remote

A deletion is (1) journaled, (2) computed in memory (obliviate.sweep.sweep), (3) staged in a
temporary folder that is renamed into place when complete: the commit point, then (4) applied:
store rows, block files, manifest, metrics, audit record, DVC/git commit, purge of superseded
DVC objects from the cache and from the default DVC remote. Every apply step is idempotent. On
the next run ``recover`` re-applies a complete staging folder, drops an incomplete one and
re-runs journaled requests, so SIGKILL at any point leaves the old state or, after recovery, the
new one. A remote that cannot be reached does not hold a deletion back: its purge stays pending
and recovery retries it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from obliviate import audit, versioning
from obliviate.compat import fingerprint_for
from obliviate.config import Config
from obliviate.errors import ObliviateError, RequestError
from obliviate.faults import crashpoint
from obliviate.hashing import file_digest
from obliviate.partition import INDEX, MANIFEST, block_entry, block_file, read_manifest, save_npz
from obliviate.requests import SampleIndex

log = logging.getLogger(__name__)
HOLDER = "writer.holder.json"


class LockError(ObliviateError):
    """Another writer holds the writer lock."""


def _command() -> str:
    """The holder's program, with its subcommand if it is obliviate's CLI (``obliviate
    forget``), never other arguments: those may be sample ids."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if program in ("obliviate", "cli.py") and len(sys.argv) > 1:
        return f"obliviate {sys.argv[1][:20]}"
    return program if program.endswith(".py") or program.isidentifier() else "python"


@dataclass(frozen=True)
class State:
    root: Path

    @classmethod
    def of(cls, cfg: Config) -> State:
        return cls(cfg.paths.state)

    @property
    def requests(self) -> Path:
        return self.root / "requests"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @contextlib.contextmanager
    def lock(self, wait: float | None = None, can_wait: bool = True) -> Iterator[None]:
        """The writer lock: one deletion, drain or training at a time. An OS lock (filelock), so
        a killed holder frees it. When it is held, say who holds it and wait ``wait`` seconds
        (None: as long as it takes; 0: not at all), else LockError. ``can_wait``: whether the
        command has --wait to suggest (torchrun training has not)."""
        from filelock import FileLock, Timeout

        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / "writer.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            who = self._holder()
            if wait == 0:
                hint = ", or pass --wait SECONDS to wait for it" if can_wait else ""
                raise LockError(
                    f"{who} holds the writer lock of {self.root}; run again when it has "
                    f"finished{hint}."
                ) from None
            limit = "" if wait is None else f" up to {wait:g} s"
            print(f"waiting{limit} for {who} to release the writer lock of {self.root} ...",
                  file=sys.stderr, flush=True)  # fmt: skip
            try:
                lock.acquire(timeout=-1 if wait is None else wait)
            except Timeout:
                raise LockError(
                    f"{who} still holds the writer lock of {self.root} after {wait:g} s; run "
                    "again later or pass a longer --wait."
                ) from None
        holder = self.root / HOLDER
        try:
            write_json_atomic(holder, {"pid": os.getpid(), "since": time.strftime("%H:%M:%S"),
                                       "command": _command()})  # fmt: skip
            yield
        finally:
            holder.unlink(missing_ok=True)
            lock.release()

    def _holder(self) -> str:
        """Who holds the lock, as written when it was taken (no sample id: see _command)."""
        try:
            h = json.loads((self.root / HOLDER).read_text())
            return f"`{h['command']}` (pid {h['pid']}, since {h['since']})"
        except (OSError, ValueError, KeyError):
            return "another obliviate process"

    def pending(self) -> list[dict]:
        if not self.requests.is_dir():
            return []
        entries = [json.loads(p.read_text()) for p in sorted(self.requests.glob("*.json"))]
        return [e for e in entries if e["status"] == "accepted"]


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def new_request_id() -> str:
    return f"del-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def journal_request(state: State, request_id: str, ids: list[str], force: bool) -> None:
    entry = {
        "request_id": request_id,
        "ids": ids,
        "force": force,
        "status": "accepted",
        "submitted_at": time.time(),
    }
    write_json_atomic(state.requests / f"{request_id}.json", entry)


def finish_request(state: State, request_id: str, status: str = "done", why: str = "") -> None:
    """Close a journal entry and drop its ids: only the audit's hashes remain."""
    path = state.requests / f"{request_id}.json"
    if path.is_file():
        entry = json.loads(path.read_text())
        entry.update(status=status, ids=[], finished_at=time.time(), reason=why)
        write_json_atomic(path, entry)


# --------------------------------------------------------------------------- staging


@dataclass
class Staging:
    """A deletion's staging folder while it is computed: retrained rows stream into ``rows.zarr``
    (laid out like the store, so installing them is a rename per chunk)."""

    folder: Path
    rows: dict  # name ("params", "optimizer") -> zarr.Array

    def put(self, k: int, theta: np.ndarray, opt: np.ndarray | None) -> None:
        self.rows["params"][k] = theta
        if opt is not None:
            self.rows["optimizer"][k] = opt


def begin(cfg: Config, request_id: str, store) -> Staging:
    """An empty staging folder for ``request_id`` (not yet committed: recovery drops it)."""
    tmp = State.of(cfg).staging / f".tmp-{request_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return Staging(tmp, store.staging_arrays(tmp / "rows.zarr"))


def stage(
    cfg: Config,
    staging: Staging,
    request_id: str,
    sweep,
    record: dict,
    superseded_md5: list[str],
    journal: dict,
) -> dict:
    """Complete the redo record of a computed deletion; its final rename is the commit point.

    ``journal``: the journaled request this deletion belongs to (``journal_id``) and whether it
    is the request's last planned sweep (``last_part``), which finishes the journal entry.

    ``sweep`` is the forget.Sweep (None when only validation samples leave). The new manifest
    and store fingerprint are derived here from the staged block files, so the record states
    exactly what ``apply`` will install. Returns the staged transaction.
    """
    tmp = staging.folder
    (tmp / "blocks").mkdir()
    rows = None
    if sweep is not None:
        rows = [sweep.first, sweep.stop + 1]
        n_blocks = staging.rows["params"].shape[0] - 1
        if sweep.stop < n_blocks:
            staging.rows["params"][n_blocks] = sweep.served  # M', the served row
        if sweep.shift is not None:
            np.save(tmp / "shift.npy", sweep.shift)
    new_blocks = record.pop("new_blocks")
    manifest = read_manifest(cfg.paths.blocks)
    removed = 0
    for k, s in new_blocks.items():
        path = tmp / "blocks" / block_file(k)
        save_npz(path, ids=s.ids, y=s.y, x=s.x, slot=s.slot)
        entry = block_entry(manifest, k)
        if k > 0:
            removed += entry["n"] - len(s.ids)
        entry.update(n=len(s.ids), sha256=file_digest(path))
    index = SampleIndex.of(cfg.paths.blocks)
    kept = np.concatenate([s.ids for s in new_blocks.values()])
    gone = index.ids[np.isin(index.block, list(new_blocks)) & ~np.isin(index.ids, kept)]
    index = index.without(list(gone))
    save_npz(tmp / INDEX, ids=index.ids, block=index.block, label=index.label)
    manifest["n_samples"] -= removed
    record = {
        **record,
        "blocks_after": {str(k): block_entry(manifest, k)["sha256"] for k in sorted(new_blocks)},
    }
    txn = {
        "request_id": request_id,
        "rows": rows,
        "blocks": sorted(new_blocks),
        "manifest": manifest,
        "fingerprint": fingerprint_for(cfg, manifest),
        "delta_plot": [
            {"block": record["first_block"] + i, "delta": d} for i, d in enumerate(record["deltas"])
        ],
        "record": record,
        "superseded_md5": superseded_md5,
        **journal,
    }
    write_json_atomic(tmp / "txn.json", txn)
    crashpoint("before_commit")
    os.replace(tmp, State.of(cfg).staging / request_id)  # <- commit point
    return txn


def staged_ids(state: State) -> list[str]:
    if not state.staging.is_dir():
        return []
    return sorted(p.name for p in state.staging.iterdir() if not p.name.startswith(".tmp-"))


def drop_incomplete(state: State) -> None:
    if state.staging.is_dir():
        for p in state.staging.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- apply


def apply(cfg: Config, request_id: str) -> dict:
    """Install a staged deletion; safe to run again after a crash at any point."""
    from obliviate.store import ParamStore

    state = State.of(cfg)
    folder = state.staging / request_id
    txn = json.loads((folder / "txn.json").read_text())
    store = ParamStore.open(cfg.paths.store)
    rows = range(*txn["rows"]) if txn["rows"] else range(0)
    shift = np.load(folder / "shift.npy") if (folder / "shift.npy").is_file() else None
    store.install_deletion(
        request_id, folder / "rows.zarr", rows, shift, txn["fingerprint"],
        txn.get("reference_drop", []),
    )  # fmt: skip
    crashpoint("after_store")
    for k in txn["blocks"]:
        staged = folder / "blocks" / block_file(int(k))
        if staged.is_file():
            os.replace(staged, cfg.paths.blocks / block_file(int(k)))
            crashpoint("after_block")
    if (folder / INDEX).is_file():
        os.replace(folder / INDEX, cfg.paths.blocks / INDEX)
    write_json_atomic(cfg.paths.blocks / MANIFEST, txn["manifest"])
    write_json_atomic(cfg.paths.metrics / "forget_delta.json", {"delta": txn["delta_plot"]})
    audit.append_record(cfg.paths.audit, txn["record"])
    crashpoint("after_audit")
    clock = time.perf_counter()
    versioned = versioning.commit(
        cfg, [cfg.paths.blocks, cfg.paths.store], f"obliviate: forget request {request_id}"
    )
    versioning_s = time.perf_counter() - clock
    crashpoint("after_commit")
    purged = purge_cache(cfg, txn["superseded_md5"])
    remote = purge_remote(cfg, txn["superseded_md5"])
    if txn.get("last_part", True):  # before removing the redo record: a crash in between
        finish_request(state, txn.get("journal_id", request_id))
    done = state.staging / f".tmp-{request_id}"  # re-applies (a no-op), never re-runs it;
    os.replace(folder, done)  # renamed first, so a crash mid-removal leaves only a .tmp-
    shutil.rmtree(done)  # folder, which recovery drops
    timings = {**txn["record"]["timings_s"], "versioning": versioning_s}  # DVC and git
    return {**txn["record"], "timings_s": timings, "versioned": versioned,
            "purged_cache_objects": purged, **remote}  # fmt: skip


def dvc_cache_dir(root: Path) -> Path:
    return root / ".dvc" / "cache" / "files" / "md5"


def purge_cache(cfg: Config, md5s: list[str]) -> int:
    """Delete superseded objects from the DVC cache by hash (`dvc gc` would keep history).

    Objects the current dvc.lock still references (an unchanged metadata file, say) stay.
    """
    cache = dvc_cache_dir(cfg.root)
    in_use = md5s_in_use(cfg.root)
    removed = 0
    for h in set(md5s) - in_use:
        obj = cache / h[:2] / h[2:]
        with contextlib.suppress(FileNotFoundError):
            obj.unlink()
            removed += 1
    return removed


def md5s_in_use(root: Path) -> set[str]:
    """Every file hash the current dvc.lock points at, through the .dir listings."""
    used: set[str] = set()
    for outs in versioning.lock_outs(root).values():
        for _, md5 in outs:
            used.add(md5)
            listing = dvc_cache_dir(root) / md5[:2] / md5[2:]
            if md5.endswith(".dir") and listing.is_file():
                used |= {entry["md5"] for entry in json.loads(listing.read_text())}
    return used


def purge_remote(cfg: Config, md5s: list[str] = ()) -> dict:
    """Delete superseded objects from the project's default DVC remote too (those the current
    dvc.lock still references stay), with any an earlier try left pending.

    The hashes are written to <state>/remote_purge.json first: a crash, or a remote that cannot
    be reached, leaves them there, and recovery or the next deletion retries. Returns the
    record's fields: ``remote_purge`` ("done", "pending" or "no remote"),
    ``purged_remote_objects`` and, when pending, ``remote_purge_error`` (one sentence, also
    logged as a warning). Never raises: the deletion is committed by then."""
    if not versioning.is_dvc_project(cfg.root):
        return {"remote_purge": "no remote", "purged_remote_objects": 0}
    pending = State.of(cfg).root / "remote_purge.json"
    todo = set(md5s) | set(json.loads(pending.read_text())["md5"] if pending.is_file() else [])
    if todo:
        write_json_atomic(pending, {"md5": sorted(todo)})
    try:
        n = versioning.purge_remote(cfg.root, todo - md5s_in_use(cfg.root))
    except versioning.VersioningError as exc:
        log.warning("%s", exc)
        return {"remote_purge": "pending", "purged_remote_objects": 0,
                "remote_purge_error": str(exc)}  # fmt: skip
    pending.unlink(missing_ok=True)
    return {"remote_purge": "no remote" if n is None else "done", "purged_remote_objects": n or 0}


def superseded_files(cfg: Config, store, blocks: list[int], rows: list[int]) -> list[Path]:
    """Files a deletion replaces: affected blocks (0: the validation split), retrained rows, the
    last row, metadata."""
    files = [cfg.paths.blocks / block_file(k) for k in blocks]
    files += [cfg.paths.blocks / INDEX, cfg.paths.blocks / MANIFEST]  # they name every sample
    files += store.files_for_rows([*rows, store.n_blocks])
    return [f for f in files if f.is_file()]


def recover(cfg: Config, run_request) -> list[str]:
    """Finish what a crash interrupted; ``run_request(cfg, entry)`` re-runs a journaled request."""
    state = State.of(cfg)
    drop_incomplete(state)
    versioning.repair_dvc_locks(
        cfg.root, cfg.paths.state
    )  # a deletion killed inside DVC can leave them broken
    done = []
    for request_id in staged_ids(state):
        apply(cfg, request_id)
        done.append(request_id)
    for entry in state.pending():
        try:
            run_request(cfg, entry)
        except RequestError as exc:  # became invalid meanwhile: record why, do not retry forever
            why = audit.redact(str(exc), entry["ids"], audit.IdHasher.of(cfg))
            finish_request(state, entry["request_id"], status="refused", why=why)
            continue
        done.append(entry["request_id"])
    if not done and (state.root / "remote_purge.json").is_file():  # else apply retried it
        purge_remote(cfg)
    return done
