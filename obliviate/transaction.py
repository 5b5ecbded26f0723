"""Crash-safe deletions: a staged redo record and an idempotent apply, under one writer lock.

    <state>/staging/<id>/        everything a deletion will write, complete before it counts
    <state>/writer.lock          one writer at a time (an OS file lock: a killed holder frees it)
    <state>/writer.holder.json   who holds it (pid, command, since), for the one waiting

A deletion's sweep (``obliviate.sweep``) streams its rows into a temporary staging folder; the
rest of the redo record (M', the shift, the new blocks, manifest and audit record) joins them,
and the folder is renamed into place: the commit point. ``apply`` then installs it: store rows,
block files, manifest, the audit record, the DVC/git version, the purge of superseded DVC
objects from the cache and the default remote (``obliviate.versioning``). Every apply step is
idempotent, so ``recover`` re-applies a complete staging folder and drops an incomplete one:
SIGKILL at any point leaves the old state or, after recovery, the new one. Which requests a
deletion serves is the request journal's business (``obliviate.lifecycle``).
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
from obliviate.errors import ObliviateError
from obliviate.faults import crashpoint
from obliviate.hashing import file_digest
from obliviate.partition import INDEX, MANIFEST, block_entry, block_file, read_manifest, save_npz
from obliviate.requests import SampleIndex
from obliviate.store import ParamStore

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


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def new_deletion_id() -> str:
    return f"del-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


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


def begin(cfg: Config, txn_id: str, store) -> Staging:
    """An empty staging folder for ``txn_id`` (not yet committed: recovery drops it)."""
    tmp = State.of(cfg).staging / f".tmp-{txn_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return Staging(tmp, store.staging_arrays(tmp / "rows.zarr"))


def stage(
    cfg: Config,
    staging: Staging,
    txn_id: str,
    sweep,
    record: dict,
    superseded_md5: list[str],
    reference_drop: list[int],
) -> dict:
    """Complete the redo record of a computed deletion; its final rename is the commit point.

    ``sweep`` is the sweep.Sweep (None when only validation samples leave). The new manifest
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
        "txn_id": txn_id,
        "rows": rows,
        "blocks": sorted(new_blocks),
        "manifest": manifest,
        "fingerprint": fingerprint_for(cfg, manifest),
        "delta_plot": [
            {"block": record["first_block"] + i, "delta": d} for i, d in enumerate(record["deltas"])
        ],
        "record": record,
        "superseded_md5": superseded_md5,
        "reference_drop": reference_drop,  # validation slots that leave: the guard's too
        "pins": [] if sweep is None else sweep.pins,  # a thinned store's newly kept rows
        "unshift": [] if sweep is None else sweep.unshift,
    }
    write_json_atomic(tmp / "txn.json", txn)
    crashpoint("before_commit")
    os.replace(tmp, State.of(cfg).staging / txn_id)  # <- commit point
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


def apply(cfg: Config, txn_id: str) -> dict:
    """Install a staged deletion or consolidation; safe to run again after a crash at any point."""
    state = State.of(cfg)
    folder = state.staging / txn_id
    txn = json.loads((folder / "txn.json").read_text())
    store = ParamStore.open(cfg.paths.store)
    rows = range(*txn["rows"]) if txn["rows"] else range(0)
    if txn.get("kind") == "consolidation":
        store.install_consolidation(
            txn_id, folder / "rows.zarr", rows, txn["reference"], txn.get("pins", []),
            txn.get("unpin", []),
        )  # fmt: skip
        crashpoint("after_store")
        # the store changed; the prepare stage is committed too: its dep, the audit, did
        changed = [cfg.paths.blocks, cfg.paths.store]
        message = f"obliviate: consolidation {txn_id}"
    else:
        shift = np.load(folder / "shift.npy") if (folder / "shift.npy").is_file() else None
        store.install_deletion(
            txn_id, folder / "rows.zarr", rows, shift, txn["fingerprint"],
            txn.get("reference_drop", []), txn.get("pins", []), txn.get("unshift", []),
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
        changed = [cfg.paths.blocks, cfg.paths.store]
        message = f"obliviate: forget request {txn_id}"
    audit.append_record(cfg.paths.audit, txn["record"])
    crashpoint("after_audit")
    clock = time.perf_counter()
    versioned = versioning.commit(cfg, changed, message)
    versioning_s = time.perf_counter() - clock
    crashpoint("after_commit")
    purged = versioning.purge_cache(cfg.root, txn["superseded_md5"])
    remote = versioning.purge_remote(cfg, txn["superseded_md5"])
    done = state.staging / f".tmp-{txn_id}"  # re-applies (a no-op), never re-runs it;
    os.replace(folder, done)  # renamed first, so a crash mid-removal leaves only a .tmp-
    shutil.rmtree(done)  # folder, which recovery drops
    timings = {**txn["record"]["timings_s"], "versioning": versioning_s}  # DVC and git
    return {**txn["record"], "timings_s": timings, "versioned": versioned,
            "purged_cache_objects": purged, **remote}  # fmt: skip


def superseded_files(cfg: Config, store, blocks: list[int], rows: list[int]) -> list[Path]:
    """Files a deletion replaces: affected blocks (0: the validation split), retrained rows, the
    last row, metadata."""
    files = [cfg.paths.blocks / block_file(k) for k in blocks]
    files += [cfg.paths.blocks / INDEX, cfg.paths.blocks / MANIFEST]  # they name every sample
    files += store.files_for_rows([*rows, store.n_blocks])
    return [f for f in files if f.is_file()]


def recover(cfg: Config) -> list[str]:
    """Finish what a crash interrupted at this level: drop incomplete staging folders, repair
    DVC's lock state (a deletion killed inside DVC can leave it broken), apply every committed
    one, and retry a remote purge left pending. Returns the transactions applied."""
    state = State.of(cfg)
    drop_incomplete(state)
    versioning.repair_dvc_locks(cfg.root, cfg.paths.state)
    done = []
    for txn_id in staged_ids(state):
        apply(cfg, txn_id)
        done.append(txn_id)
    if not done:  # else apply retried it
        versioning.purge_remote(cfg)
    return done
