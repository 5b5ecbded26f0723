"""Balanced block partition and the on-disk blocks (the project's own copy of the training data).

Layout of ``paths.blocks``:
    manifest.json          dataset info, B, seed, per-block size and sha256, the validation split
    index.npz              ids, block, label of every sample (no contents); block 0 = validation
    validation.npz         the validation split: ids, y, x, slot; never trained on
    block_0001.npz ...     ids (N_k,), y (N_k,), x (N_k, ...), slot (N_k,) -- uncompressed, so a
                           purge can be checked by searching for a sample's raw bytes
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Container
from dataclasses import asdict
from pathlib import Path

import numpy as np

from obliviate.data import Dataset, DatasetInfo, Samples
from obliviate.errors import PartitionError, StoreError
from obliviate.hashing import file_digest

MANIFEST = "manifest.json"
INDEX = "index.npz"  # ids, block and label of every sample: answers "where is id X" at once
VALIDATION = "validation.npz"  # block 0 in the index: held out from training, judged on


def balanced_partition(labels: np.ndarray, n_blocks: int, seed: int) -> list[np.ndarray]:
    """Split sample indices into ``n_blocks`` disjoint, label-balanced blocks.

    Each class's indices are shuffled and the classes are laid end to end; position i of that
    sequence goes to block i mod B. So block sizes are |D|//B or |D|//B + 1, and every class's
    count in a block is floor or ceil of n_c / B (within 1 of the ideal). Within a block the
    order is shuffled once; that order is fixed for all training and retraining.
    """
    labels = np.asarray(labels)
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if n_blocks > n:
        raise PartitionError(f"B={n_blocks} blocks exceeds the {n} samples; lower prepare.blocks.")
    if n_blocks > counts.min():
        rare = classes[counts.argmin()]
        raise PartitionError(
            f"B={n_blocks} exceeds the {counts.min()} samples of class {rare}, so some block would "
            f"miss that class; set prepare.blocks to at most {counts.min()}."
        )
    rng = np.random.default_rng(seed)
    sequence = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in classes])
    owner = np.arange(n) % n_blocks
    return [rng.permutation(sequence[owner == b]) for b in range(n_blocks)]


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a label-balanced validation split: floor(n_c * fraction) of each class c
    (at least one where fraction > 0), seeded. These samples are never trained on."""
    labels = np.asarray(labels)
    if fraction == 0:
        return np.array([], dtype=np.int64)
    rng = np.random.default_rng([seed, 1])
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = min(max(1, int(len(members) * fraction)), len(members) - 1)
        picked.append(rng.choice(members, n, replace=False))
    return np.sort(np.concatenate(picked))


def split_training(labels: np.ndarray, fraction: float, n_blocks: int, seed: int):
    """The validation split and B balanced blocks of the rest, as indices into ``labels``."""
    val = validation_split(labels, fraction, seed)
    rest = np.setdiff1d(np.arange(len(labels)), val)
    return val, [rest[b] for b in balanced_partition(np.asarray(labels)[rest], n_blocks, seed)]


def without_forgotten(dataset: Dataset, forgotten: Container[str]) -> Dataset:
    """Drop the samples the audit lists as forgotten (``audit.Forgotten``: a membership test on
    raw ids), so a re-partition cannot resurrect them."""
    if not forgotten:
        return dataset
    keep = np.array([str(i) not in forgotten for i in dataset.train.ids], dtype=bool)
    return Dataset(dataset.info, dataset.train.take(keep), dataset.test)


def block_file(k: int) -> str:
    """The file of block k; block 0 is the validation split."""
    return VALIDATION if k == 0 else f"block_{k:04d}.npz"


def block_entry(manifest: dict, k: int) -> dict:
    """The manifest's entry (file, n, slots, sha256) of block k; 0 is the validation split."""
    return manifest["validation"] if k == 0 else manifest["blocks"][k - 1]


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez with fixed zip timestamps: equal arrays give equal bytes, hence equal hashes
    (DVC sees no change when a block is rewritten with the same contents)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def write_blocks(
    dataset: Dataset,
    blocks: list[np.ndarray],
    out_dir: Path,
    test_path: Path,
    params: dict,
    extra: dict | None = None,
    val: np.ndarray | None = None,
) -> dict:
    """Write blocks, the validation split ``val`` (indices into dataset.train), manifest and test
    set atomically: a crash leaves the old copy or the new one.

    Everything is written next to the destination and moved into place with renames.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        entries = []
        for k, idx in enumerate(blocks, start=1):
            s = dataset.train.take(idx)
            save_npz(tmp / block_file(k), ids=s.ids, y=s.y, x=s.x, slot=np.arange(len(idx)))
            sha = file_digest(tmp / block_file(k))
            entries.append({"file": block_file(k), "n": len(idx), "slots": len(idx), "sha256": sha})
        val = np.array([], dtype=np.int64) if val is None else np.asarray(val)
        v = dataset.train.take(val)
        save_npz(tmp / VALIDATION, ids=v.ids, y=v.y, x=v.x, slot=np.arange(len(val)))
        validation = {"file": VALIDATION, "n": len(val), "slots": len(val),
                      "sha256": file_digest(tmp / VALIDATION)}  # fmt: skip
        manifest = {
            "format": 1,
            "dataset": asdict(dataset.info),
            "n_blocks": len(blocks),
            "n_samples": int(sum(len(b) for b in blocks)),
            "params": params,
            "blocks": entries,
            "validation": validation,
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        train = dataset.train
        parts = [val, *blocks]
        block_of = np.concatenate([np.full(len(b), k) for k, b in enumerate(parts)])
        order = np.concatenate(parts)
        save_npz(tmp / INDEX, ids=train.ids[order], block=block_of, label=train.y[order])
        test_tmp = test_path.with_name(f".{test_path.name}.tmp.npz")
        save_npz(test_tmp, ids=dataset.test.ids, y=dataset.test.y, x=dataset.test.x)
        _replace_dir(tmp, out_dir)
        os.replace(test_tmp, test_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def partition_dataset(dataset: Dataset, prepare, blocks_dir: Path, test_path: Path) -> dict:
    """Split (``prepare``: val_fraction, blocks, seed) and write, without a verifying owner: the
    short path of scratch workspaces (reports, benchmarks, tests)."""
    val, blocks = split_training(
        dataset.train.y, prepare.val_fraction, prepare.blocks, prepare.seed
    )
    params = prepare.model_dump(mode="json")
    return write_blocks(dataset, blocks, blocks_dir, test_path, params, val=val)


def _replace_dir(new: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(blocks_dir: Path) -> dict:
    path = blocks_dir / MANIFEST
    if not path.is_file():
        raise StoreError(f"{path} is missing; run `obliviate partition` first.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("blocks"), list):
        raise StoreError(f"{path} is not a block manifest; {_BLOCK_FIX}.")
    return manifest


def dataset_info(manifest: dict) -> DatasetInfo:
    d = dict(manifest["dataset"])
    d["input_shape"] = tuple(d["input_shape"])
    if d.get("image_root") is not None and "resize" not in d:  # written before native sizes
        d["resize"] = d["input_shape"][-1]
    return DatasetInfo(**d)


def load_block(blocks_dir: Path, k: int) -> Samples:
    """Block k (1-based) as written by write_blocks (minus forgotten samples), after checking
    its sha256 against the manifest (once per file version and process: see verify_block);
    k = 0 is the validation split."""
    path = verify_block(blocks_dir, k)
    try:
        with np.load(path, allow_pickle=False) as z:
            return Samples(z["ids"], z["y"], z["x"], z["slot"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # matched, yet unreadable
        raise StoreError(f"{path} cannot be read ({type(exc).__name__}); {_BLOCK_FIX}.") from None


_BLOCK_FIX = "restore the blocks with `dvc checkout` (or rebuild them with `obliviate partition`)"
# Block files whose sha256 matched the manifest, by (path, size, mtime, inode, expected sha256):
# hashing a block is cheap next to training on it, but a deletion loads a block many times.
_verified: set[tuple] = set()


def verify_block(blocks_dir: Path, k: int, manifest: dict | None = None) -> Path:
    """The path of block k once its bytes match the manifest's sha256; StoreError otherwise."""
    manifest = manifest if manifest is not None else read_manifest(blocks_dir)
    path = blocks_dir / block_file(k)
    entries = manifest.get("blocks", [])
    listed = (k == 0 and "validation" in manifest) or 1 <= k <= len(entries)
    if not listed or block_entry(manifest, k).get("file") != block_file(k):
        raise StoreError(f"{blocks_dir / MANIFEST} lists no block {k}; {_BLOCK_FIX}.")
    expected = block_entry(manifest, k).get("sha256")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise StoreError(f"{path} is missing; {_BLOCK_FIX}.") from None
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, expected)
    if key in _verified:
        return path
    if file_digest(path) != expected:
        raise StoreError(
            f"{path} does not match its sha256 in {MANIFEST} (corrupt or changed); {_BLOCK_FIX}."
        )
    if len(_verified) > 100_000:
        _verified.clear()
    _verified.add(key)
    return path


def load_samples(path: Path) -> Samples:
    if not path.is_file():
        raise StoreError(f"{path} is missing; run `obliviate partition` first.")
    try:
        with np.load(path, allow_pickle=False) as z:
            return Samples(z["ids"], z["y"], z["x"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise StoreError(
            f"{path} cannot be read ({type(exc).__name__}); restore it with `dvc checkout` (or "
            "rebuild it with `obliviate partition`)."
        ) from None
