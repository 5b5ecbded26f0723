"""Integrity: ``obliviate fsck`` and the check every deletion and evaluation runs first.

``check(cfg)`` reads the whole workspace and returns one sentence per problem, writing nothing:

- the store: format, completed rows, the layout of a row, every chunk of every row and shift
  present and decoding with its CRC32C checksum, the fingerprint against the blocks;
- the blocks: the manifest, every block file against its sha256, sizes, the id index;
- the audit trail: every line a record, each ``model_before`` equal to the previous record's
  ``model_after``, keyed hashes made with the present id key;
- the request journal and the staging folder (interrupted deletions) and the id key file.

``preflight(cfg)`` is the cheap part that evaluate, verify, forget and drain run before they
write anything: the store complete, every chunk of every row present with a right checksum (a
CRC32C of the stored bytes, no decompression: it costs one read of the store), every block file
matching the manifest's sha256. It raises the first problem as a StoreError.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from obliviate.compat import fingerprint_for
from obliviate.config import Config
from obliviate.errors import ObliviateError, StoreError

STORE_FIX = "restore it with `dvc checkout` or rebuild it with `obliviate train --overwrite`"
BLOCKS_FIX = "restore the blocks with `dvc checkout` (or rebuild them with `obliviate partition`)"
RECOVER = "run `obliviate drain` to finish it (recovery runs first)"


# --------------------------------------------------------------------------- preflight


def preflight(cfg: Config) -> None:
    """Refuse to go on with a damaged workspace: StoreError naming the first problem.

    Checks every store row's chunks (present, CRC32C right, read straight from the stored bytes),
    the shifts, every block and the validation split against the manifest's sha256."""
    from obliviate.partition import read_manifest, verify_block
    from obliviate.store import ParamStore

    store = ParamStore.open(cfg.paths.store)
    store.require_complete()
    for problem in store_chunk_problems(store):
        raise StoreError(problem)
    manifest = read_manifest(cfg.paths.blocks)
    validation = [0] if "validation" in manifest else []
    for k in validation + list(range(1, len(manifest["blocks"]) + 1)):
        verify_block(cfg.paths.blocks, k, manifest)


def store_chunk_problems(store, first_row: int = 0, decode: bool = False) -> Iterator[str]:
    """One sentence per missing or corrupt chunk of rows first_row..completed and of the shift
    rows covering them. ``decode``: decode every row through zarr (slower; fsck) instead of only
    checking each chunk's stored CRC32C."""
    from obliviate.store import _covers

    last = store.completed
    arrays = [store.params] + ([store.optimizer] if store.optimizer is not None else [])
    for arr in arrays:
        for i in range(first_row, last + 1):
            if not store.is_kept(i):  # train.store_every: not on disk, rebuilt by replay
                continue
            if (problem := _row_problem(store, arr, i, None, decode)) is not None:
                yield problem
    shifts = store.meta.get("shifts", [])
    needed = [s for s in shifts if any(_covers(s["ranges"], k) for k in range(first_row, last))]
    if needed:
        arr = store.group.get("shifts")
        if arr is None:
            yield f"{store.path}: the stitching shifts are missing; {STORE_FIX}."
            return
        for s in needed:
            if s["index"] >= arr.shape[0]:
                yield f"{store.path}: shift {s['index']} is missing; {STORE_FIX}."
            elif (p := _row_problem(store, arr, s["index"], s["ranges"][0][0], decode)) is not None:
                yield p


def _row_problem(store, arr, i: int, of: int | None, decode: bool) -> str | None:
    from obliviate.store import chunk_keys

    if decode or store.is_remote:
        try:
            store.read_row(arr, i, of)
        except StoreError as exc:
            return str(exc)
        return None
    import google_crc32c  # zarr's own crc32c implementation

    name = arr.basename
    what = f"row {i} of {name}" + ("" if of is None else f" (needed by P_{of})")
    for key in chunk_keys(arr, i):
        path = store.path / name / key
        if not path.is_file():
            return f"{store.path}: {what} has a missing chunk ({name}/{key}); {STORE_FIX}."
        data = path.read_bytes()
        # zarr's crc32c codec appends the CRC32C of the compressed bytes, little-endian
        if len(data) < 4 or google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little"):
            return f"{store.path}: {what} is corrupt (its checksum does not match); {STORE_FIX}."
    return None


# --------------------------------------------------------------------------- fsck


def check(cfg: Config) -> list[str]:
    """Every problem of the workspace, one sentence each; reads only."""
    problems: list[str] = []
    manifest = _check_blocks(cfg, problems)
    _check_store(cfg, manifest, problems)
    _check_audit(cfg, manifest, problems)
    _check_journal(cfg, problems)
    _check_key(cfg, problems)
    _check_deadline(cfg, problems)
    return problems


def _check_deadline(cfg: Config, problems: list[str]) -> None:
    """A deletion still approximate past consolidate.max_age missed its deadline."""
    import time

    from obliviate.objectstore import is_url
    from obliviate.store import ParamStore

    if is_url(str(cfg.paths.store)) or not (cfg.paths.store / "zarr.json").is_file():
        return
    try:
        pending = ParamStore.open(cfg.paths.store).approximate
    except ObliviateError:
        return  # said by the store's own checks
    late = [a for a in pending if time.time() - a["committed"] > cfg.consolidate.max_age_s]
    if late:
        problems.append(
            f"deletion {late[0]['deletion']} has been approximate for "
            f"{(time.time() - late[0]['committed']) / 3600:.1f} h, past consolidate.max_age "
            f"{cfg.consolidate.max_age} ({len(late)} such); run `obliviate consolidate`."
        )


def _guard(problems: list[str], fn, *args):
    """Run one check; an ObliviateError becomes a problem instead of ending fsck."""
    try:
        return fn(*args)
    except ObliviateError as exc:
        problems.append(str(exc))
    return None


def _check_blocks(cfg: Config, problems: list[str]) -> dict | None:
    from obliviate.partition import INDEX, block_entry, block_file, read_manifest, verify_block

    blocks = cfg.paths.blocks
    manifest = _guard(problems, read_manifest, blocks)
    if manifest is None:
        return None
    entries = manifest["blocks"]
    if manifest.get("n_blocks") != len(entries):
        problems.append(
            f"{blocks / 'manifest.json'} says {manifest.get('n_blocks')} blocks but lists "
            f"{len(entries)}; {BLOCKS_FIX}."
        )
    scanned, n_total = [], 0
    ks = [0] * ("validation" in manifest) + list(range(1, len(entries) + 1))  # 0: validation
    for k in ks:
        if _guard(problems, verify_block, blocks, k, manifest) is None:
            continue
        path = blocks / block_file(k)
        try:
            with np.load(path, allow_pickle=False) as z:
                ids, y, slot = z["ids"], z["y"], z["slot"]
        except Exception as exc:  # its sha256 matched, so the manifest describes a bad file
            problems.append(f"{path} cannot be read ({type(exc).__name__}); {BLOCKS_FIX}.")
            continue
        n = block_entry(manifest, k).get("n")
        if not len(ids) == len(y) == len(slot) == n:
            problems.append(
                f"{path} holds {len(ids)} samples but the manifest says {n}; {BLOCKS_FIX}."
            )
        n_total += len(ids) * (k > 0)
        scanned.append((ids.astype(str), np.full(len(ids), k)))
    if len(scanned) == len(ks) and manifest.get("n_samples") != n_total:
        problems.append(
            f"{blocks / 'manifest.json'} counts {manifest.get('n_samples')} samples but the "
            f"blocks hold {n_total}; {BLOCKS_FIX}."
        )
    index_path = blocks / INDEX
    if not index_path.is_file():
        problems.append(f"{index_path} is missing; {BLOCKS_FIX}.")
    elif len(scanned) == len(ks) and scanned:
        try:
            with np.load(index_path, allow_pickle=False) as z:
                index = sorted(zip(z["ids"].astype(str).tolist(), z["block"].tolist(), strict=True))
        except Exception as exc:
            problems.append(f"{index_path} cannot be read ({type(exc).__name__}); {BLOCKS_FIX}.")
        else:
            ids = np.concatenate([s[0] for s in scanned]).tolist()
            owner = np.concatenate([s[1] for s in scanned]).tolist()
            if index != sorted(zip(ids, owner, strict=True)):
                problems.append(
                    f"{index_path} does not list the samples the block files hold; {BLOCKS_FIX}."
                )
    return manifest


def _check_store(cfg: Config, manifest: dict | None, problems: list[str]) -> None:
    from obliviate.objectstore import is_url
    from obliviate.store import ParamStore

    if not is_url(str(cfg.paths.store)) and not (cfg.paths.store / "zarr.json").is_file():
        problems.append(f"no parameter store at {cfg.paths.store}; run `obliviate train`.")
        return
    store = _guard(problems, ParamStore.open, cfg.paths.store)
    if store is None:
        return
    _guard(problems, store.require_complete)
    meta = store.meta
    for what, entries, width in (
        ("parameter", meta.get("layout", []), store.params.shape[1]),
        ("optimizer", meta.get("optimizer_layout", []),
         0 if store.optimizer is None else store.optimizer.shape[1]),
    ):  # fmt: skip
        if not _contiguous(entries, width):
            problems.append(
                f"{store.path}: the {what} layout does not cover a row of {width} values "
                f"exactly; {STORE_FIX}."
            )
    if store.params.shape[0] != store.n_blocks + 1:
        problems.append(
            f"{store.path} has {store.params.shape[0]} rows for {store.n_blocks} blocks; "
            f"{STORE_FIX}."
        )
    problems.extend(store_chunk_problems(store, 0, decode=True))
    if manifest is not None:
        if manifest.get("n_blocks") != store.n_blocks:
            problems.append(
                f"{store.path} holds {store.n_blocks} blocks but the manifest "
                f"{manifest.get('n_blocks')}; {STORE_FIX}."
            )
        else:
            if meta.get("fingerprint") != fingerprint_for(cfg, manifest):
                problems.append(
                    f"{store.path} was built with other params or blocks than the workspace's; "
                    f"{STORE_FIX} (or restore the params and blocks it was built with)."
                )


def _contiguous(entries: list[dict], width: int) -> bool:
    offset = 0
    for e in entries:
        size = e.get("size", int(np.prod(e.get("shape", [])))) if isinstance(e, dict) else None
        if size is None or e.get("offset") != offset:
            return False
        offset += size
    return offset == width


def _check_audit(cfg: Config, manifest: dict | None, problems: list[str]) -> None:
    from obliviate.audit import ID_HASH, IdHasher, manifest_key_ids

    path = cfg.paths.audit
    also = manifest_key_ids(manifest) if manifest else set()
    if not path.is_file():
        _guard(problems, IdHasher.existing, cfg, also)
        return
    fix = f"restore it from git (`git checkout -- {path.name}` in its folder)"
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        problems.append(f"{path} is not text; {fix}.")
        return
    previous, seen, torn = None, set(), False
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            r = None
        if not (isinstance(r, dict) and isinstance(r.get("request_id"), str)
                and isinstance(r.get("sample_id_hashes"), list)):  # fmt: skip
            problems.append(f"{path}:{n} is not an audit record; {fix}.")
            previous, torn = None, True
            continue
        if r["request_id"] in seen:
            problems.append(f"{path}:{n} repeats deletion {r['request_id']}; {fix}.")
        seen.add(r["request_id"])
        if r.get("id_hash") not in (None, ID_HASH):
            problems.append(f"{path}:{n} names an unknown id hash {r['id_hash']!r}; {fix}.")
        before = r.get("model_before")
        after = previous.get("model_after") if previous is not None else None
        if before and after and before != after:
            problems.append(
                f"{path}:{n}: deletion {r['request_id']} started from model {before[:12]}, not "
                f"from the model {after[:12]} the deletion before it left; {fix}."
            )
        previous = r
    if not torn:  # keyed hashes need the key that made them
        _guard(problems, IdHasher.existing, cfg, also)


def _check_journal(cfg: Config, problems: list[str]) -> None:
    from obliviate.lifecycle import STATUSES, UNFINISHED, journal_dir

    state, journal = cfg.paths.state, journal_dir(cfg)
    for path in sorted(journal.glob("req-*.json")) if journal.is_dir() else []:
        entry = _json(path)
        if entry is None or entry.get("status") not in STATUSES:
            problems.append(
                f"{path} is not a deletion request; remove it and submit the request again (the "
                "deletion it named is in the audit if it happened)."
            )
        elif entry["status"] in UNFINISHED:
            problems.append(
                f"request {path.stem} is {entry['status']}: deletion {entry.get('deletion')} was "
                f"interrupted; {RECOVER}."
            )
        elif entry["status"] in ("done", "refused") and entry.get("ids"):
            problems.append(
                f"{path} is {entry['status']} but still holds raw sample ids; remove the file "
                "(the audit keeps the hashes)."
            )
    for old in ("inbox", "requests/del-*.json"):
        if list(state.glob(old)):
            problems.append(
                f"{state / old} is from an older obliviate; run `obliviate drain`, which moves "
                "its requests into the one journal."
            )
    for folder in sorted((state / "staging").iterdir()) if (state / "staging").is_dir() else []:
        if folder.name.startswith(".tmp-"):
            problems.append(f"{folder} is an incomplete staging folder; {RECOVER} (it is dropped).")
        elif _json(folder / "txn.json") is None or not (folder / "rows.zarr").is_dir():
            problems.append(
                f"{folder} is a staged deletion without a readable txn.json or rows.zarr; "
                "restore the workspace from its last DVC/git version and remove the folder."
            )
        else:
            problems.append(f"deletion {folder.name} is staged but not applied; {RECOVER}.")


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _check_key(cfg: Config, problems: list[str]) -> None:
    from obliviate.audit import KEY_FILE

    path = cfg.paths.state / KEY_FILE
    if path.is_file() and stat.S_IMODE(path.stat().st_mode) & 0o077:
        problems.append(f"{path} is readable by other users; run `chmod 600 {path}`.")
