"""The deletion audit trail: one JSON record per deletion, hashes only, never sample contents.

The trail is a JSON-lines file (params.yaml ``paths.audit``) that git versions next to dvc.lock.
It is rewritten whole through a temporary file and a rename, so a crash leaves the old trail or
the new one, never a torn line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def id_hash(sample_id: str) -> str:
    """What the audit keeps of a sample id."""
    return hashlib.sha256(f"obliviate-sample:{sample_id}".encode()).hexdigest()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (sha256 for our records; md5 is what DVC's cache uses)."""
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def forgotten_hashes(path: Path) -> set[str]:
    return {h for r in read_records(path) for h in r["sample_id_hashes"]}


def append_record(path: Path, record: dict) -> bool:
    """Append ``record`` unless its request is already recorded; True if it was appended."""
    records = read_records(path)
    if any(r["request_id"] == record["request_id"] for r in records):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for r in [*records, record]:
            f.write(json.dumps(r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True
