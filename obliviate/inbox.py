"""The deletion inbox: requests wait here until a drain forgets them in one sweep.

    <state>/inbox/<request_id>.json    one file per request, written atomically (tmp + rename)

A request moves queued -> running -> done | refused. ``submit`` needs no writer lock (a new file
with a unique name), so it returns at once while a deletion runs; ``drain`` (under the writer
lock) batches every queued request into one deletion. Requests are files, so they survive a
restart of the Prefect server and of the worker; a drain killed mid-way leaves its requests
``running`` with the deletion's id, and the next drain marks them done if the audit holds that
deletion, or queues them again. Once a request is finished its raw ids are dropped: only their
keyed hashes stay (HMAC-SHA256 under the id key, see obliviate.audit), so the inbox keeps no
trace of a forgotten sample that anyone without the key could test a guessed id against.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from obliviate.audit import Forgotten, IdHasher, read_records, redact
from obliviate.config import Config
from obliviate.errors import RequestError
from obliviate.objectstore import require_local
from obliviate.requests import plan_deletion

STATUSES = ("queued", "running", "done", "refused")


def inbox_dir(cfg: Config) -> Path:
    return cfg.paths.state / "inbox"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write(folder: Path, entry: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{entry['request_id']}.json"
    tmp = folder / f".{path.name}.tmp"
    tmp.write_text(json.dumps(entry, indent=1, sort_keys=True))
    os.replace(tmp, path)


def submit(cfg: Config, ids: list[str], force: bool = False) -> str:
    """Queue a deletion request and return its id; refuse bad input at once, writing nothing.

    The same ids (and force) as a request a drain was running when it was killed join that
    request: a `forget` retried after a crash finishes it (its deletion may already be in the
    audit, so its ids are not refused as forgotten) instead of queuing a second one."""
    require_local(cfg.paths.store)
    joined = _running_with(cfg, ids, force)
    if joined:
        return joined
    plan_deletion(ids, cfg.paths.blocks, Forgotten.of(cfg), force)  # unknown, forgotten, unsafe
    request_id = f"req-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    entry = {"request_id": request_id, "status": "queued", "ids": list(ids), "force": force,
             "n_samples": len(ids), "submitted_at": _now(), "order": time.time_ns()}  # fmt: skip
    _write(inbox_dir(cfg), entry)
    return request_id


def _running_with(cfg: Config, ids: list[str], force: bool) -> str | None:
    """The request a killed drain left running with these ids, if any (a damaged request file
    is skipped here: queuing needs no other request, the drain names it)."""
    folder = inbox_dir(cfg)
    for path in sorted(folder.glob("req-*.json")) if folder.is_dir() else []:
        try:
            e = _read(path)
        except RequestError:
            continue
        same = sorted(e.get("ids", [])) == sorted(ids) and e.get("force") == force
        if e["status"] == "running" and same:
            return e["request_id"]
    return None


def entries(cfg: Config) -> list[dict]:
    """Every request, oldest first."""
    folder = inbox_dir(cfg)
    if not folder.is_dir():
        return []
    return sorted((_read(p) for p in folder.glob("req-*.json")), key=lambda e: e["order"])


def get(cfg: Config, request_id: str) -> dict:
    path = inbox_dir(cfg) / f"{request_id}.json"
    if "/" in request_id or not path.is_file():
        raise RequestError(
            f"no deletion request {request_id[:80]!r} in {inbox_dir(cfg)}; use the id that "
            "`obliviate request` printed."
        )
    return _read(path)


def _read(path: Path) -> dict:
    try:
        entry = json.loads(path.read_text())
        if isinstance(entry, dict) and {"request_id", "status", "order"} <= entry.keys():
            return entry
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    raise RequestError(
        f"the deletion request file {path} is damaged; restore it from a backup, or remove it "
        "and submit the request again."
    )


def finish(cfg: Config, entry: dict, status: str, reason: str | None = None) -> dict:
    """Mark a request done or refused and drop its raw ids (hashes stay)."""
    ids = entry.pop("ids", [])
    if "id_hashes" not in entry:
        hasher = IdHasher.of(cfg)
        entry |= {"id_hashes": sorted(hasher(i) for i in ids), **hasher.scheme()}
    entry |= {"status": status, "finished_at": _now(), "finished_unix": time.time(),
              "reason": reason}  # fmt: skip
    _write(inbox_dir(cfg), entry)
    return entry


@dataclass(frozen=True)
class Batch:
    """What one drain forgets: the accepted requests and the union of their ids."""

    accepted: list[dict]
    refused: list[dict]
    ids: list[str]
    force: bool


def reconcile(cfg: Config, finish_done: bool = True) -> list[dict]:
    """After a crash: running requests whose deletion is in the audit are done; others queue
    again. Call under the writer lock, after the deletion journal's own recovery. With
    ``finish_done=False`` the done ones are returned still running, for the caller to finish
    (`deletion.drain` refreshes the metrics first)."""
    audited = {r["request_id"] for r in read_records(cfg.paths.audit)}
    changed = []
    for e in entries(cfg):
        if e["status"] != "running":
            continue
        journal = _journal_entry(cfg, e.get("deletion"))
        if e.get("deletion") in audited or journal.get("status") == "done":
            changed.append(finish(cfg, e, "done") if finish_done else e)
        elif journal.get("status") == "refused":  # the deletion itself was refused: final
            why = redact(journal.get("reason", ""), e["ids"], IdHasher.of(cfg))
            changed.append(finish(cfg, e, "refused", why))
        else:
            e |= {"status": "queued", "deletion": None}
            _write(inbox_dir(cfg), e)
            changed.append(e)
    return changed


def _journal_entry(cfg: Config, deletion_id: str | None) -> dict:
    path = cfg.paths.state / "requests" / f"{deletion_id}.json"
    return json.loads(path.read_text()) if deletion_id and path.is_file() else {}


def claim(cfg: Config, only: str | None = None) -> Batch:
    """Validate queued requests in order (every one, or ``only`` that one and the queued ones
    whose ids it covers, such as the request of a `forget` killed before its drain claimed it);
    refuse the ones that cannot go (with the reason) and batch the rest. A request that is fine
    alone but not together with the earlier ones (e.g. both would empty one block) is refused:
    first come, first served."""
    accepted, refused, ids, force = [], [], [], False
    gone = Forgotten.of(cfg)
    queued = [e for e in entries(cfg) if e["status"] == "queued"]
    named = [e for e in queued if e["request_id"] == only]
    covered = set(named[0]["ids"]) if named else set()
    for e in queued:
        if only is not None and e["request_id"] != only and not set(e["ids"]) <= covered:
            continue
        new = [i for i in e["ids"] if i not in set(ids) and i not in gone]
        if not new:  # every id already forgotten (by another request meanwhile): done
            e["deletion"] = e.get("deletion") or "an earlier deletion"
            accepted.append(e)
            continue
        try:  # alone, with its own --force; then together with the earlier requests
            plan_deletion(new, cfg.paths.blocks, gone, e["force"])
            plan_deletion(ids + new, cfg.paths.blocks, gone, force or e["force"])
        except RequestError as exc:
            alone_ok = _fine_alone(cfg, new, e["force"])
            why = redact(str(exc), e["ids"] + ids, IdHasher.of(cfg))
            if alone_ok:
                why = f"it conflicts with requests queued before it ({why})"
            refused.append(finish(cfg, e, "refused", why))
            continue
        accepted.append(e)
        ids += new
        force = force or e["force"]
    return Batch(accepted, refused, ids, force)


@contextlib.contextmanager
def withdrawn_unless_claimed(cfg: Config, request_id: str) -> Iterator[None]:
    """For a direct forget: if draining its request fails or is interrupted before a drain
    claimed it (a held lock, Ctrl-C, a refused check), withdraw it, so that nothing of it stays
    and no later drain forgets what the user saw fail."""
    try:
        yield
    except BaseException:
        withdraw(cfg, request_id)
        raise


def withdraw(cfg: Config, request_id: str) -> None:
    """Remove a request that is still queued (a direct `forget` that could not start): nothing
    of it stays, raw ids included."""
    path = inbox_dir(cfg) / f"{request_id}.json"
    if path.is_file() and json.loads(path.read_text())["status"] == "queued":
        path.unlink()


def _fine_alone(cfg: Config, ids: list[str], force: bool) -> bool:
    try:
        plan_deletion(ids, cfg.paths.blocks, Forgotten.of(cfg), force)
    except RequestError:
        return False
    return True


def mark_running(cfg: Config, batch: Batch, deletion_id: str) -> None:
    for e in batch.accepted:
        e |= {"status": "running", "deletion": deletion_id, "started_at": _now()}
        _write(inbox_dir(cfg), e)


def preflight(cfg: Config) -> None:
    """What every deletion needs, checked before any request is claimed: a local, complete
    store. A failure leaves the requests queued."""
    from obliviate.store import ParamStore

    require_local(cfg.paths.store)
    ParamStore.open(cfg.paths.store).require_complete()


def mark_done(cfg: Config, batch: Batch) -> list[dict]:
    return [finish(cfg, e, "done") for e in batch.accepted]


def counts(cfg: Config) -> dict[str, int]:
    out = dict.fromkeys(STATUSES, 0)
    for e in entries(cfg):
        out[e["status"]] += 1
    return out


def describe(entry: dict) -> str:
    """One line for `obliviate status REQUEST_ID`."""
    base = f"{entry['request_id']}: {entry['status']} ({entry['n_samples']} sample(s)"
    if entry["status"] == "queued":
        return f"{base}, submitted {entry['submitted_at']}; waiting for the next drain)"
    if entry["status"] == "running":
        return f"{base}, deletion {entry['deletion']} started {entry['started_at']})"
    if entry["status"] == "done":
        return f"{base}, forgotten by deletion {entry['deletion']} at {entry['finished_at']})"
    return f"{base}, refused at {entry['finished_at']}): {entry['reason']}"
