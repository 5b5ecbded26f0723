"""The parameter store: checkpoints P_0..P_B in a chunked, compressed, lossless Zarr v3 group.

    store.zarr/
      params      float32 (B+1, |theta|)   row k = P_k; chunks of one row (split when huge)
      optimizer   float32 (B+1, |state|)   only when the recipe keeps optimizer state

``params.attrs["obliviate"]`` holds the layout (name, shape, offset of every tensor), the
fingerprint of the params that built the store and ``completed``: the last row written in full.
Rows are written in order by a writer process (obliviate.store_writer) and ``completed`` moves
after each write (zarr writes each file atomically), so an interrupted run resumes from row
``completed``.

Integrity: every chunk ends in a CRC32C checksum (zarr's ``crc32c`` codec after the Blosc
compressor), every chunk is written even when it holds only zeros (``write_empty_chunks``), so a
missing chunk is always an error, never zarr's fill value. ``read`` raises StoreError, naming the
row and the fix, on a missing or corrupt chunk (``obliviate fsck`` checks every row).

The path is a local folder or an object-storage URL (``s3://bucket/prefix``, see
obliviate.objectstore); zarr reaches a URL through fsspec. Deletions need a local store.
"""

from __future__ import annotations

import queue
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from obliviate.errors import StoreError
from obliviate.objectstore import Location, StoreURL, as_location, require_local, stored_bytes
from obliviate.store_writer import encode, encode_end

FORMAT = 2  # 2: crc32c on every chunk, empty chunks written
MAX_CHUNK_ELEMS = 1 << 22  # 16 MiB of float32 per chunk; rows of larger models are split


def codec() -> BloscCodec:
    # Byte-shuffled zstd: lossless, and shuffling groups the similar exponent bytes of floats.
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def compressors() -> list:
    """The bytes-to-bytes codecs of every array: compress, then append a CRC32C of the result
    (decoding checks it first, so a flipped byte never reaches the decompressor)."""
    return [codec(), Crc32cCodec()]


# Write a chunk even when it equals the fill value: then a missing chunk is never legitimate.
ARRAY_CONFIG = {"write_empty_chunks": True}


@dataclass
class StoreMeta:
    fingerprint: str
    n_blocks: int
    layout: list[dict]
    optimizer_layout: list[dict]
    extra: dict  # dataset, model, recipe: for humans and `obliviate info`
    completed: int = -1


class ParamStore:
    def __init__(self, path: Location | str):
        self.path = as_location(path)
        self.group = zarr.open_group(str(self.path), mode="r+")
        self.params = self.group["params"].with_config(ARRAY_CONFIG)
        opt = self.group.get("optimizer")
        self.optimizer = None if opt is None else opt.with_config(ARRAY_CONFIG)

    # ------------------------------------------------------------------ creation and opening
    @classmethod
    def create(cls, path: Location | str, meta: StoreMeta, n_params: int, n_opt: int) -> ParamStore:
        path = as_location(path)
        if isinstance(path, Path) and path.exists():
            shutil.rmtree(path)  # a URL's old objects go with mode "w" below (tests/test_s3.py)
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        rows = meta.n_blocks + 1
        for name, width in (("params", n_params), ("optimizer", n_opt)):
            if width == 0:
                continue
            group.create_array(
                name,
                shape=(rows, width),
                dtype="float32",
                chunks=(1, min(width, MAX_CHUNK_ELEMS)),
                compressors=compressors(),
                fill_value=0.0,
                config=ARRAY_CONFIG,
            )
        group["params"].attrs["obliviate"] = {"format": FORMAT, **meta.__dict__}
        return cls(path)

    @classmethod
    def open(cls, path: Location | str) -> ParamStore:
        path = as_location(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"no parameter store at {path}; run `obliviate train` first.")
        store = cls(path)
        if store.meta.get("format") != FORMAT:
            raise StoreError(
                f"{path} is not an obliviate store of format {FORMAT} (checksummed chunks); "
                "rebuild it with `obliviate train --overwrite`."
            )
        return store

    # ------------------------------------------------------------------ metadata
    @property
    def meta(self) -> dict:
        return dict(self.params.attrs["obliviate"])

    @property
    def completed(self) -> int:
        return int(self.meta["completed"])

    @property
    def n_blocks(self) -> int:
        return int(self.meta["n_blocks"])

    def _set_completed(self, k: int) -> None:
        self.params.attrs["obliviate"] = {**self.meta, "completed": k}

    def require_complete(self) -> None:
        if self.completed != self.n_blocks:
            raise StoreError(
                f"{self.path} holds {self.completed} of {self.n_blocks} blocks; "
                "run `obliviate train` to finish it."
            )

    # ------------------------------------------------------------------ rows
    def read(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """P_k (|theta|,) and its optimizer state (None when the recipe keeps none).

        P_k is the row as the consistent store defines it: the stored row plus every stitching
        shift whose ranges cover k (see ``apply_deletion``).
        """
        opt = self.read_row(self.optimizer, k) if self.optimizer is not None else None
        theta = self.read_row(self.params, k)
        covering = [s["index"] for s in self.meta.get("shifts", []) if _covers(s["ranges"], k)]
        if covering:
            shifts = self.group["shifts"]
            total = theta.astype(np.float64)
            for i in covering:
                total += self.read_row(shifts, i, of=k)
            theta = total.astype(np.float32)
        return theta, opt

    def read_row(self, arr: zarr.Array, i: int, of: int | None = None) -> np.ndarray:
        """Row i of ``arr``, every chunk present and its checksum right, else one StoreError.

        ``of``: the checkpoint P_k this row is read for (a shift row serves several)."""
        name = arr.basename
        missing = [key for key in chunk_keys(arr, i) if not (self.path / name / key).is_file()]
        what = f"row {i} of {name}" + ("" if of is None else f" (needed by P_{of})")
        fix = "restore it with `dvc checkout` or rebuild it with `obliviate train --overwrite`"
        if missing:
            raise StoreError(
                f"{self.path}: {what} has a missing chunk ({name}/{missing[0]}); {fix}."
            )
        try:
            return arr[i]
        except (ValueError, RuntimeError, OSError) as exc:  # crc32c mismatch, blosc, I/O
            why = "its checksum does not match" if "checksum" in str(exc) else _first_line(exc)
            raise StoreError(f"{self.path}: {what} is corrupt ({why}); {fix}.") from None

    # ------------------------------------------------------------------ deletions
    def apply_deletion(
        self,
        request_id: str,
        k0: int,
        thetas: np.ndarray,
        opts: np.ndarray | None,
        served: np.ndarray,
        shift: np.ndarray | None,
        fingerprint: str,
    ) -> None:
        """Install a deletion's retrained rows; idempotent, so a crash can be redone.

        thetas: (n, |theta|) P'_{k0}..P'_{k0+n-1}, the retrained rows, stored exactly.
        served: the stitched model M', stored as the last row P_B.
        shift: P'_{d+t} - P_{d+t} (float64), applied lazily to rows d+t+1..B-1: they are not
        rewritten (at ResNet-50 scale that would take minutes); ``read`` adds the shift.
        """
        n_blocks, stop = self.n_blocks, k0 + len(thetas) - 1
        self.params[k0 : stop + 1] = thetas
        if self.optimizer is not None:
            self.optimizer[k0 : stop + 1] = opts
        self.params[n_blocks] = served
        meta = self.meta
        shifts = [s for s in meta.get("shifts", []) if s["request"] != request_id]
        for s in shifts:  # the rewritten rows are exact now: no older shift applies to them
            s["ranges"] = _remove_range(s["ranges"], k0, stop)
        if shift is not None and stop + 1 <= n_blocks - 1:
            index = len(shifts)
            arr = self.group.get("shifts")
            if arr is None:
                arr = self.group.create_array(
                    "shifts",
                    shape=(0, len(shift)),
                    dtype="float64",
                    chunks=(1, min(len(shift), MAX_CHUNK_ELEMS)),
                    compressors=compressors(),
                    config=ARRAY_CONFIG,
                )
            arr = arr.with_config(ARRAY_CONFIG)
            if arr.shape[0] <= index:
                arr.resize((index + 1, len(shift)))
            arr[index] = shift
            shifts.append(
                {"request": request_id, "index": index, "ranges": [[stop + 1, n_blocks - 1]]}
            )
        self.params.attrs["obliviate"] = {**meta, "shifts": shifts, "fingerprint": fingerprint}

    @property
    def is_remote(self) -> bool:
        return isinstance(self.path, StoreURL)

    def require_local(self) -> None:
        require_local(self.path)

    def files_for_rows(self, rows: list[int]) -> list[Path]:
        """The files that hold these rows (chunks of params and optimizer) plus the metadata."""
        self.require_local()
        out = [self.path / "zarr.json", self.path / "params" / "zarr.json"]
        for name in ("params", "optimizer"):
            for k in rows:
                out.extend(sorted((self.path / name / "c" / str(k)).glob("*")))
        return [p for p in out if p.is_file()]

    def write(self, k: int, theta: np.ndarray, opt: np.ndarray | None) -> None:
        self.write_rows(k, np.asarray(theta)[None], None if opt is None else np.asarray(opt)[None])

    def write_rows(self, k0: int, thetas: np.ndarray, opts: np.ndarray | None) -> None:
        """Rows k0..k0+n-1 in one call (one round trip through zarr), then mark them complete."""
        k1 = k0 + len(thetas)
        self.params[k0:k1] = thetas
        if self.optimizer is not None:
            self.optimizer[k0:k1] = opts
        self._set_completed(k1 - 1)

    def async_writer(self, depth: int = 4) -> RowWriter:
        return RowWriter(self, depth)

    def summary(self) -> dict:
        """What `obliviate info` and the training flow report about the store."""
        meta = self.meta
        return {
            "store": str(self.path),
            "dataset": meta["extra"]["dataset"]["name"],
            "model": meta["extra"]["recipe"]["model"],
            "blocks": self.n_blocks,
            "completed": self.completed,
            "parameters": int(self.params.shape[1]),
            "optimizer_state": int(self.optimizer.shape[1]) if self.optimizer is not None else 0,
            "stored_bytes": self.nbytes_stored(),
            "raw_bytes": self.nbytes_raw(),
            "chunks": list(self.params.chunks),
            "compressors": [str(c) for c in self.params.compressors],
            "deletion_shifts": len(meta.get("shifts", [])),
        }

    # ------------------------------------------------------------------ sizes
    def nbytes_stored(self) -> int:
        if self.is_remote:
            return stored_bytes(self.path)
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def nbytes_raw(self) -> int:
        arrays = [self.params] + ([self.optimizer] if self.optimizer is not None else [])
        return int(sum(np.prod(a.shape) * 4 for a in arrays))


def chunk_keys(arr: zarr.Array, i: int) -> list[str]:
    """The keys, relative to the array's folder, of the chunks that hold row i (chunks of one
    row, split along the row when it is wide; zarr v3's default "c/i/j" key encoding)."""
    width, step = arr.shape[1], arr.chunks[1]
    return [f"c/{i}/{j}" for j in range(-(-width // step))]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:120].rstrip(".")


def _covers(ranges: list[list[int]], k: int) -> bool:
    return any(lo <= k <= hi for lo, hi in ranges)


def _remove_range(ranges: list[list[int]], lo: int, hi: int) -> list[list[int]]:
    out = []
    for a, b in ranges:
        if b < lo or a > hi:
            out.append([a, b])
            continue
        if a < lo:
            out.append([a, lo - 1])
        if b > hi:
            out.append([hi + 1, b])
    return out


class RowWriter:
    """Streams rows to a writer process so training never waits on compression or disk.

    ``put`` hands a row to a feeder thread, which pipes it to ``obliviate.store_writer``
    (blocking in the kernel, not holding the GIL). The queue is bounded, so a slow disk applies
    back-pressure instead of growing memory. A writer failure is raised in the training thread
    at the next ``put`` or on exit. Reopen the store afterwards: the writer changed it.
    """

    def __init__(self, store: ParamStore, depth: int):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.proc: subprocess.Popen | None = None
        self.thread = threading.Thread(
            target=self._feed, name="obliviate-store-feeder", daemon=True
        )

    def __enter__(self) -> RowWriter:
        cmd = [sys.executable, "-m", "obliviate.store_writer", str(self.store.path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self.thread.start()
        return self

    def put(self, k: int, theta, opt) -> None:
        self._raise_if_failed()
        self.queue.put(encode(k, np.asarray(theta), None if opt is None else np.asarray(opt)))

    def _feed(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.proc.stdin.write(item)
                except OSError as exc:  # the writer died; its stderr says why
                    self.error = exc

    def _raise_if_failed(self) -> None:
        if self.error is not None or (self.proc and self.proc.poll() not in (None, 0)):
            self.proc.wait()
            detail = self.proc.stderr.read().decode().strip() or str(self.error)
            raise StoreError(f"writing {self.store.path} failed: {detail}")

    def __exit__(self, exc_type, *exc) -> None:
        self.queue.put(None)  # on an exception too: rows already queued still land
        self.thread.join()
        if self.error is None:
            try:
                self.proc.stdin.write(encode_end())
            except OSError as err:
                self.error = err
        self.proc.stdin.close()
        self.proc.wait()
        if exc_type is None:
            self._raise_if_failed()
