"""The request lifecycle: one journal entry per deletion request, and the one state machine.

    <state>/requests/<request id>.json   one file per request, each write atomic (tmp + rename)
    <state>/requests/refresh.json        the metric refresh owed since a deletion landed

    queued ──claim──▶ running ──stage──▶ committed ──apply──▶ done
       │                 │
       └──▶ refused ◀────┘

- **queued**: submitted: the file holds the raw ids and the plan ({block: ids}) made when the
  request was validated. Submitting needs no writer lock (a new file with a unique name).
- **running**: a drain (under the writer lock) claimed it for deletion ``del-...`` with other
  queued requests, and is retraining.
- **committed**: the deletion's last transaction is staged (the commit point of
  ``obliviate.transaction``): from here on it is applied, never computed again.
- **done**: applied: the ids left the blocks, the store, every DVC version and cache, and the
  audit record is in git. The raw ids are dropped; their keyed hashes stay.
- **refused**: with one sentence why, ids named by keyed hash.

Each transition is one file write, so each is a crash point, and recovery (``deletion.recover``)
reads this same journal: a running or committed request is finished from the ids it still holds
(those the audit does not list yet). Refreshing the test metric and the verdict is a separate
step that does not hold a request back: ``refresh.json`` says it is owed (``obliviate status``
then shows the metrics as stale) until a drain pays it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from obliviate.audit import Forgotten, IdHasher, redact
from obliviate.config import Config
from obliviate.errors import RequestError
from obliviate.objectstore import require_local
from obliviate.requests import plan_deletion, refuse_unsafe_together

STATUSES = ("queued", "running", "committed", "done", "refused")
UNFINISHED = ("running", "committed")  # claimed by a deletion that has not landed yet
REFRESH = "refresh.json"


def journal_dir(cfg: Config) -> Path:
    return cfg.paths.state / "requests"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write(cfg: Config, entry: dict, name: str | None = None) -> None:
    folder = journal_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name or f"{entry['request_id']}.json")
    tmp = folder / f".{path.name}.tmp"
    tmp.write_text(json.dumps(entry, indent=1, sort_keys=True))
    os.replace(tmp, path)


def world(cfg: Config) -> str:
    """What a request's plan depends on besides its ids: the blocks (their manifest) and what
    the audit has forgotten. A plan made under another value must be made again."""
    h = hashlib.sha256()
    for path in (cfg.paths.blocks / "manifest.json", cfg.paths.audit):
        h.update(path.read_bytes() if path.is_file() else b"-")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- queued


def submit(cfg: Config, ids: list[str], force: bool = False) -> str:
    """Validate a deletion request, queue it with its plan and return its id; refuse bad input
    at once (one sentence naming the ids), writing nothing.

    A request with the same ids (and force) that a drain killed mid-way left unfinished, or
    whose deletion landed but whose command did not finish (the metric refresh is still owed
    for its deletion), is joined instead: a `forget` retried after a crash finishes that request
    rather than queuing a second one or refusing its ids as already forgotten."""
    require_local(cfg.paths.store)
    joined = _unfinished_with(cfg, ids, force)
    if joined:
        return joined
    token = world(cfg)
    plan = plan_deletion(ids, cfg.paths.blocks, Forgotten.of(cfg), force)
    request_id = f"req-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    entry = {"request_id": request_id, "status": "queued", "ids": list(ids), "force": force,
             "plan": {str(k): v for k, v in plan.items()}, "planned_in": token,
             "n_samples": len(ids), "submitted_at": _now(), "order": time.time_ns()}  # fmt: skip
    _write(cfg, entry)
    return request_id


def _unfinished_with(cfg: Config, ids: list[str], force: bool) -> str | None:
    owed = (refresh_owed(cfg) or {}).get("after")
    hasher = None
    for e in _entries_skipping_damaged(cfg):
        if e.get("force") != force or e.get("n_samples") != len(ids):
            continue
        if e["status"] in UNFINISHED and sorted(e.get("ids", [])) == sorted(ids):
            return e["request_id"]
        if e["status"] == "done" and owed and e.get("deletion") == owed:
            hasher = hasher or IdHasher.existing(cfg)
            if hasher and sorted(e.get("id_hashes", [])) == sorted(hasher(i) for i in ids):
                return e["request_id"]
    return None


def _entries_skipping_damaged(cfg: Config) -> list[dict]:
    """Every request file that reads (queuing needs no other request: the drain names a damaged
    one)."""
    out = []
    for path in sorted(journal_dir(cfg).glob("req-*.json")) if journal_dir(cfg).is_dir() else []:
        with contextlib.suppress(RequestError):
            out.append(_read(path))
    return out


def entries(cfg: Config) -> list[dict]:
    """Every request, oldest first; a damaged file is one sentence."""
    folder = journal_dir(cfg)
    if not folder.is_dir():
        return []
    return sorted((_read(p) for p in folder.glob("req-*.json")), key=lambda e: e["order"])


def get(cfg: Config, request_id: str) -> dict:
    path = journal_dir(cfg) / f"{request_id}.json"
    if "/" in request_id or not request_id.startswith("req-") or not path.is_file():
        raise RequestError(
            f"no deletion request {request_id[:80]!r} in {journal_dir(cfg)}; use the id that "
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


@contextlib.contextmanager
def withdrawn_unless_claimed(cfg: Config, request_id: str) -> Iterator[None]:
    """For a direct forget: if draining its request fails or is interrupted before a drain
    claimed it (a held lock, Ctrl-C, a refused check), withdraw it, so that nothing of it stays
    and no later drain forgets what the user saw fail."""
    try:
        yield
    except BaseException:
        path = journal_dir(cfg) / f"{request_id}.json"
        if path.is_file() and json.loads(path.read_text())["status"] == "queued":
            path.unlink()
        raise


# --------------------------------------------------------------------------- claim


@dataclass
class Batch:
    """What one drain forgets: the accepted requests, the union of their ids still to forget
    and its plan {block: ids}; the requests refused on the way."""

    accepted: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    plan: dict[int, list[str]] = field(default_factory=dict)
    force: bool = False


def claim(cfg: Config, only: str | None = None) -> Batch:
    """Take queued requests in order (every one, or ``only`` that one and the queued ones whose
    ids it covers, such as the request of a `forget` killed before its drain claimed it) and
    batch them into one deletion. Each request's plan is the one made when it was submitted,
    unless the blocks or the audit changed since (then it is planned again); a request that
    cannot go is refused with the reason, and so is one that is fine alone but not together
    with the earlier ones (e.g. both would empty one block): first come, first served. Ids
    forgotten meanwhile need nothing more: such a request is accepted with nothing to do."""
    batch, gone, token = Batch(), Forgotten.of(cfg), world(cfg)
    queued = [e for e in entries(cfg) if e["status"] == "queued"]
    named = [e for e in queued if e["request_id"] == only]
    covered = set(named[0]["ids"]) if named else set()
    for e in queued:
        if only is not None and e["request_id"] != only and not set(e["ids"]) <= covered:
            continue
        new = [i for i in e["ids"] if i not in set(batch.ids) and i not in gone]
        if not new:
            batch.accepted.append(e)
            continue
        try:
            if new == e["ids"] and e.get("planned_in") == token:
                plan = {int(k): v for k, v in e["plan"].items()}
            else:
                plan = plan_deletion(new, cfg.paths.blocks, gone, e["force"])
            if batch.ids:
                together = batch.force or e["force"]
                try:
                    refuse_unsafe_together(batch.ids + new, cfg.paths.blocks, together)
                except RequestError as exc:
                    raise RequestError(
                        f"it conflicts with requests queued before it ({exc})"
                    ) from None
        except RequestError as exc:
            why = redact(str(exc), e["ids"] + batch.ids, IdHasher.of(cfg))
            batch.refused.append(finish(cfg, e, "refused", why))
            continue
        batch.accepted.append(e)
        batch.ids += new
        for k, block_ids in plan.items():
            batch.plan.setdefault(k, []).extend(block_ids)
        batch.force = batch.force or e["force"]
    batch.plan = dict(sorted(batch.plan.items()))
    return batch


# --------------------------------------------------------------------------- transitions


def start(cfg: Config, batch: Batch, deletion_id: str) -> None:
    """queued -> running, for ``deletion_id``."""
    for e in batch.accepted:
        e |= {"status": "running", "deletion": deletion_id, "started_at": _now()}
        _write(cfg, e)


def commit(cfg: Config, deletion_id: str) -> None:
    """running -> committed: the deletion's last transaction is staged. The metric refresh is
    owed from here on (written first: a crash in between leaves it owed, never forgotten)."""
    owe_refresh(cfg, deletion_id)
    for e in claimed_by(cfg, deletion_id):
        e |= {"status": "committed", "committed_at": _now()}
        _write(cfg, e)


def claimed_by(cfg: Config, deletion_id: str) -> list[dict]:
    return [e for e in entries(cfg) if e["status"] in UNFINISHED and e["deletion"] == deletion_id]


def unfinished(cfg: Config) -> dict[str, list[dict]]:
    """The requests a killed drain left running or committed, by deletion, oldest first."""
    out: dict[str, list[dict]] = {}
    for e in entries(cfg):
        if e["status"] in UNFINISHED:
            out.setdefault(e["deletion"], []).append(e)
    return out


def finish(cfg: Config, entry: dict, status: str, reason: str | None = None) -> dict:
    """-> done or refused: drop the raw ids and the plan (their keyed hashes stay)."""
    ids = entry.pop("ids", [])
    entry.pop("plan", None)
    if "id_hashes" not in entry:
        hasher = IdHasher.of(cfg)
        entry |= {"id_hashes": sorted(hasher(i) for i in ids), **hasher.scheme()}
    entry |= {"status": status, "finished_at": _now(), "finished_unix": time.time(),
              "reason": reason}  # fmt: skip
    if status == "done" and not entry.get("deletion"):
        entry["deletion"] = "an earlier deletion"  # its ids were forgotten meanwhile
    _write(cfg, entry)
    return entry


def finish_deletion(cfg: Config, deletion_id: str, status: str, why: str | None = None):
    """Every request of ``deletion_id`` -> done, or refused with ``why`` (ids redacted here)."""
    requests = claimed_by(cfg, deletion_id)
    ids = [i for e in requests for i in e["ids"]]
    reason = None if why is None else redact(why, ids, IdHasher.of(cfg))
    return [finish(cfg, e, status, reason) for e in requests]


# --------------------------------------------------------------------------- the metric refresh


def owe_refresh(cfg: Config, deletion_id: str) -> None:
    _write(cfg, {"status": "owed", "after": deletion_id, "since": _now()}, REFRESH)


def refresh_owed(cfg: Config) -> dict | None:
    """The refresh owed (``after``: the deletion since which the metrics are stale; ``failed``:
    why the last try did not finish it), or None when the metrics are current."""
    path = journal_dir(cfg) / REFRESH
    try:
        owed = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owed if isinstance(owed, dict) and owed.get("status") == "owed" else None


def refresh_paid(cfg: Config, owed: dict, failure: str | None) -> None:
    """The refresh of ``owed`` ran: done, or still owed with the sentence why it failed. A
    deletion committed meanwhile owes its own (then this changes nothing)."""
    if refresh_owed(cfg) != owed:
        return
    if failure is None:
        _write(cfg, {**owed, "status": "paid", "paid_at": _now()}, REFRESH)
    else:
        _write(cfg, {**owed, "failed": failure}, REFRESH)


# --------------------------------------------------------------------------- reading


def counts(cfg: Config) -> dict[str, int]:
    out = dict.fromkeys(STATUSES, 0)
    for e in entries(cfg):
        out[e["status"]] += 1
    return out


def describe(entry: dict) -> str:
    """One line for `obliviate status REQUEST_ID`."""
    base = f"{entry['request_id']}: {entry['status']} ({entry['n_samples']} sample(s)"
    status = entry["status"]
    if status == "queued":
        return f"{base}, submitted {entry['submitted_at']}; waiting for the next drain)"
    if status == "running":
        return f"{base}, deletion {entry['deletion']} started {entry['started_at']})"
    if status == "committed":
        return f"{base}, deletion {entry['deletion']} committed {entry['committed_at']}; applying)"
    if status == "done":
        return f"{base}, forgotten by deletion {entry['deletion']} at {entry['finished_at']})"
    return f"{base}, refused at {entry['finished_at']}): {entry['reason']}"


def describe_metrics(cfg: Config) -> str:
    """One line on whether metrics/evaluate.json and verify.json describe the served model."""
    owed = refresh_owed(cfg)
    if owed is None:
        return "metrics: current (test accuracy and verdict of the served model)"
    why = f"; the last try failed: {owed['failed']}" if owed.get("failed") else ""
    return (
        f"metrics: stale since deletion {owed['after']} (the next `obliviate drain` or forget "
        f"refreshes them{why})"
    )


# --------------------------------------------------------------------------- older workspaces


def migrate(cfg: Config) -> None:
    """Workspaces of obliviate before this journal kept requests in <state>/inbox/ and a second
    journal of deletions (del-*.json) in <state>/requests/. Move the requests here and drop the
    deletion entries: a request a killed drain left running holds the same ids, and recovery
    finishes it from those. Call under the writer lock."""
    old = cfg.paths.state / "inbox"
    folder = journal_dir(cfg)
    for path in sorted(folder.glob("del-*.json")) if folder.is_dir() else []:
        path.unlink()
    if old.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(old.glob("req-*.json")):
            os.replace(path, folder / path.name)
        with contextlib.suppress(OSError):
            old.rmdir()
