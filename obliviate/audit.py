"""The deletion audit trail: one JSON record per deletion, hashes only, never sample contents.

The trail is a JSON-lines file (params.yaml ``paths.audit``) that git versions next to dvc.lock.
It is rewritten whole through a temporary file and a rename, so a crash leaves the old trail or
the new one, never a torn line.

Sample ids are kept only as keyed hashes, HMAC-SHA256 under a secret id key that never enters
git: the hex key in ``$OBLIVIATE_ID_KEY`` or else in ``<paths.state>/id_key`` (created on first
use, mode 0600). Without the key nobody can test a guessed id against a stored hash, which an
unkeyed hash of a small id space (``digits:0``..``digits:1796``) allowed. Every stored hash
says how it was made: ``"id_hash": "hmac-sha256"`` and ``"id_key"``, a fingerprint of the key
(an HMAC of a fixed string, not the key). Records from before keyed hashes carry neither and
hold sha256("obliviate-sample:" + id); they are still recognised (``Forgotten``), so a sample
forgotten then stays forgotten. See docs/deletion.md, "Keyed id hashes".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from obliviate.errors import StoreError, shown_id

ID_HASH = "hmac-sha256"  # the scheme recorded next to every keyed hash
KEY_ENV = "OBLIVIATE_ID_KEY"
KEY_FILE = "id_key"
MIN_KEY_BYTES = 16
_KEY_ID_MESSAGE = b"obliviate id key fingerprint"


def legacy_id_hash(sample_id: str) -> str:
    """The unkeyed hash of records written before keyed hashes; only for recognising them."""
    return hashlib.sha256(f"obliviate-sample:{sample_id}".encode()).hexdigest()


@dataclass(frozen=True)
class IdHasher:
    """HMAC-SHA256 of sample ids under the workspace's id key."""

    key: bytes = field(repr=False)

    def __call__(self, sample_id: str) -> str:
        return hmac.new(self.key, str(sample_id).encode(), hashlib.sha256).hexdigest()

    @property
    def key_id(self) -> str:
        """A fingerprint of the key, safe to store: tells which key made a hash."""
        return hmac.new(self.key, _KEY_ID_MESSAGE, hashlib.sha256).hexdigest()[:16]

    def scheme(self) -> dict:
        """The fields stored next to keyed hashes."""
        return {"id_hash": ID_HASH, "id_key": self.key_id}

    def hashes(self, ids) -> dict:
        """An audit record's id fields: the sorted keyed hashes and their scheme."""
        return {"sample_id_hashes": sorted(self(i) for i in ids), **self.scheme()}

    @classmethod
    def of(cls, cfg) -> IdHasher:
        """The workspace's hasher, creating the key on first use (only when nothing was hashed
        with another key: a lost key must be restored, not silently replaced)."""
        hasher = cls.existing(cfg)
        if hasher is None:
            hasher = cls(_create_key(cfg.paths.state / KEY_FILE))
        return hasher

    @classmethod
    def existing(cls, cfg, also: set[str] = frozenset()) -> IdHasher | None:
        """The hasher if a key exists (environment or key file), else None; never writes.
        StoreError when the audit's keyed hashes (or hashes made with the key ids ``also``, e.g.
        the manifest's owner hashes) were made with a key other than this one, or their key is
        gone."""
        hasher = _load_key(cfg.paths.state / KEY_FILE)
        used = key_ids_in_use(cfg) | set(also)
        if hasher is None and used:
            raise StoreError(
                f"the stored id hashes (audit or manifest) were made with id key "
                f"{sorted(used)[0]}, but neither ${KEY_ENV} nor {cfg.paths.state / KEY_FILE} "
                "holds a key; restore that key (without it forgotten samples cannot be "
                "recognised), see docs/deletion.md."
            )
        if hasher is not None and used - {hasher.key_id}:
            raise StoreError(
                f"the stored id hashes were made with id key {sorted(used - {hasher.key_id})[0]}, "
                f"not with the current key {hasher.key_id}; restore the key they were made with "
                f"(in {cfg.paths.state / KEY_FILE} or ${KEY_ENV}), see docs/deletion.md."
            )
        return hasher


def _load_key(path: Path) -> IdHasher | None:
    text = os.environ.get(KEY_ENV)
    origin = f"${KEY_ENV}"
    if text is None:
        if not path.is_file():
            return None
        text, origin = path.read_text(), str(path)
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) < MIN_KEY_BYTES:
        raise StoreError(
            f"{origin} is not an id key of at least {MIN_KEY_BYTES} hex-encoded bytes; restore "
            "the key (see docs/deletion.md)."
        )
    return IdHasher(key)


def _create_key(path: Path) -> bytes:
    """A new random key, written with mode 0600 and O_EXCL (a racing process's key wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key


def key_ids_in_use(cfg) -> set[str]:
    """The id keys the audit's keyed hashes were made with."""
    return {r["id_key"] for r in read_records(cfg.paths.audit) if r.get("id_hash") == ID_HASH}


def manifest_key_ids(manifest: dict) -> set[str]:
    """The id key the manifest's owner hashes were made with (none when unkeyed)."""
    owner = manifest.get("verification", {})
    return {owner["id_key"]} if owner.get("id_hash") == ID_HASH else set()


@dataclass(frozen=True)
class Forgotten:
    """Every sample the audit lists as forgotten, as a membership test on raw ids: keyed
    records through the key, records from before keyed hashes through the old unkeyed hash."""

    keyed: frozenset[str]
    legacy: frozenset[str]
    hasher: IdHasher | None

    @classmethod
    def of(cls, cfg) -> Forgotten:
        keyed, legacy = set(), set()
        for r in read_records(cfg.paths.audit):
            (keyed if r.get("id_hash") == ID_HASH else legacy).update(r["sample_id_hashes"])
        hasher = IdHasher.existing(cfg)  # raises if keyed records exist without their key
        return cls(frozenset(keyed), frozenset(legacy), hasher)

    def __contains__(self, sample_id: object) -> bool:
        sid = str(sample_id)
        if self.legacy and legacy_id_hash(sid) in self.legacy:
            return True
        return bool(self.keyed) and self.hasher is not None and self.hasher(sid) in self.keyed

    def __bool__(self) -> bool:
        return bool(self.keyed or self.legacy)

    def __len__(self) -> int:
        return len(self.keyed) + len(self.legacy)


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("request_id"), str):
            raise StoreError(
                f"{path}:{n} is not an audit record; restore the trail from git "
                f"(`git checkout -- {path.name}` in its folder)."
            )
        records.append(record)
    return records


def append_record(path: Path, record: dict) -> bool:
    """Append ``record`` unless its request is already recorded; True if it was appended."""
    records = read_records(path)
    if any(r["request_id"] == record["request_id"] for r in records):
        return False
    _write_records(path, [*records, record])
    return True


def _write_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def migrate(cfg, candidates, journal: Path) -> tuple[int, int]:
    """Rewrite the audit's and the request journal's (the folder ``journal``) unkeyed hashes as
    keyed ones, by testing every id of
    ``candidates`` (the data source's ids) against them: the same enumeration the keyed hashes
    exist to stop, done once here, by the holder of the data. Returns (records rewritten,
    records left unkeyed because some hash matched no candidate; they stay recognised).

    The old hashes stay in git history; see docs/deletion.md."""
    hasher = IdHasher.of(cfg)
    by_legacy = {legacy_id_hash(i): str(i) for i in candidates}

    def rekey(hashes: list[str]) -> dict | None:
        ids = [by_legacy.get(h) for h in hashes]
        if None in ids:
            return None
        return {"sample_id_hashes": sorted(hasher(i) for i in ids), **hasher.scheme()}

    records, done, left = read_records(cfg.paths.audit), 0, 0
    for r in records:
        if r.get("id_hash") == ID_HASH or r.get("kind") == "consolidation":  # (no sample ids)
            continue
        new = rekey(r["sample_id_hashes"])
        if new is None:
            left += 1
            continue
        r.update(new)
        done += 1
    if done:
        _write_records(cfg.paths.audit, records)
    for path in sorted(journal.glob("req-*.json")) if journal.is_dir() else []:
        entry = json.loads(path.read_text())
        if "id_hashes" in entry and entry.get("id_hash") != ID_HASH:
            new = rekey(entry["id_hashes"])
            if new is not None:
                entry |= {"id_hashes": new["sample_id_hashes"], **hasher.scheme()}
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(json.dumps(entry, indent=1, sort_keys=True))
                os.replace(tmp, path)
    return done, left


def redact(text: str, ids: list[str], hasher: IdHasher | None) -> str:
    """A reason fit to keep: every sample id in it (raw, or as messages show it: escaped, a long
    one cut) replaced by its keyed hash's first 12 digits (by ``<id>`` without a hasher)."""
    for i in sorted(ids, key=len, reverse=True):
        token = f"<id:{hasher(i)[:12]}>" if hasher else "<id>"
        shown = shown_id(i)  # how messages print it: escaped, a long one cut
        for form in (i, shown, shown.split("... (")[0]):
            text = text.replace(form, token)
    return text
