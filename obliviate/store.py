"""The parameter store: checkpoints P_0..P_B in a chunked, compressed, lossless Zarr v3 group.

    store.zarr/
      params      float32 (B+1, |theta|)   row k = P_k; chunks of one row (split when huge)
      optimizer   float32 (B+1, |state|)   only when the recipe keeps optimizer state

``params.attrs["obliviate"]`` holds the layout (name, shape, offset of every tensor), the
fingerprint of the params that built the store and ``completed``: the last row written in full.

Exactness: ``exact_through`` K says rows 0..K are bit-identical to stored training of the current
blocks from P_0 (what a naive retrain writes); the rows after it are stitched (the last) or
shifted, and ``approximate`` lists the deletions that left them so, until a consolidation
(``obliviate.consolidation``) retrains rows K+1..B and K is B again. ``exactness`` says so in
words for a reader without obliviate.
Rows are written in order by a writer process (``store_writer.RowWriter``) and ``completed``
moves after each write (zarr writes each file atomically), so an interrupted run resumes from row
``completed``.

Integrity: every chunk ends in a CRC32C checksum (zarr's ``crc32c`` codec after the Blosc
compressor), every chunk is written even when it holds only zeros (``write_empty_chunks``), so a
missing chunk is always an error, never zarr's fill value. ``read`` raises StoreError, naming the
row and the fix, on a missing or corrupt chunk (``obliviate fsck`` checks every row).

The path is a local folder or an object-storage URL (``s3://bucket/prefix``, see
obliviate.objectstore); zarr reaches a URL through fsspec. Deletions need a local store.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from obliviate.errors import StoreError
from obliviate.objectstore import Location, StoreURL, as_location, require_local, stored_bytes

FORMAT = 2  # 2: crc32c on every chunk, empty chunks written
EXACTNESS = (
    "rows 0..exact_through are bit-identical to stored training of the current blocks from P_0; "
    "the rows after it are stitched (the last) or shifted by the deletions listed in "
    "'approximate', and become exact when a consolidation retrains them"
)


def frontier_after(exact_through: int, rows: range, exact_replay: bool) -> int:
    """The exact prefix after a deletion that retrained ``rows`` from row rows.start - 1: those
    rows are exact when that row was (and replay is exact: one process, the store's device
    class), the rows after them are not (shifted, or stitched); a deletion of validation samples
    alone (no rows) changes no training row."""
    if not rows:
        return exact_through
    if exact_replay and rows.start - 1 <= exact_through:
        return rows.stop - 1
    return min(exact_through, rows.start - 1)


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
    store_every: int = 1  # s: rows 0, B and every s-th are kept; the rest replay (obliviate.rows)
    pinned: list[int] = field(default_factory=list)  # rows kept besides those (a deletion's)


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

    @property
    def exact_through(self) -> int:
        """K: rows 0..K are exact. A store from before this was recorded: exact when no deletion
        ever changed it, else only P_0 is known to be (a consolidation retrains from row 1)."""
        meta = self.meta
        if "exact_through" in meta:
            return int(meta["exact_through"])
        return self.n_blocks if "last_request" not in meta else 0

    @property
    def approximate(self) -> list[dict]:
        """The deletions whose effect is stitched or shifted (approximate), oldest first:
        ``{"deletion", "committed", "first_block", "stop_block"}``."""
        return list(self.meta.get("approximate", []))

    @property
    def exact_replay(self) -> bool:
        """Whether a deletion's retraining reproduces stored training bit for bit: a store
        trained by several processes (torchrun) adds in another order than one process."""
        return self.meta["extra"].get("parallel_size", 1) == 1

    def _set_completed(self, k: int) -> None:
        self.update_meta(completed=k)

    def update_meta(self, **changes) -> None:
        """Replace keys of attrs["obliviate"] (one atomic metadata write)."""
        self.params.attrs["obliviate"] = {**self.meta, **changes}

    def require_complete(self) -> None:
        if self.completed != self.n_blocks:
            raise StoreError(
                f"{self.path} holds {self.completed} of {self.n_blocks} blocks; "
                "run `obliviate train` to finish it."
            )

    def require_layout(self, entries: list) -> None:
        """Refuse a model whose tensors (``models.layout``: names and shapes) are not the ones
        the rows were stored for: its parameters would be read from the wrong offsets."""
        want = [(e["name"], list(e["shape"])) for e in self.meta["layout"]]
        if [(e.name, list(e.shape)) for e in entries] != want:
            raise StoreError(
                f"{self.path} was built for another architecture than train.model in "
                "params.yaml; restore the params it was built with (or retrain)."
            )

    # ------------------------------------------------------------------ rows
    # ------------------------------------------------------------------ kept rows
    @property
    def store_every(self) -> int:
        return int(self.meta.get("store_every", 1))

    def is_kept(self, k: int, pinned: bool = True) -> bool:
        """Whether row k is on disk: P_0, P_B, every s-th row and (``pinned``) the pinned ones."""
        meta = self.meta
        s = int(meta.get("store_every", 1))
        return k % s == 0 or k == meta["n_blocks"] or (pinned and k in meta.get("pinned", ()))

    def kept_rows(self) -> list[int]:
        return [k for k in range(self.n_blocks + 1) if self.is_kept(k)]

    def base_of(self, k: int) -> int:
        """The nearest kept row at or below k: where a replay of row k starts."""
        meta = self.meta
        if k == meta["n_blocks"]:
            return k
        pins = [p for p in meta.get("pinned", ()) if p <= k]
        return max([k - k % int(meta.get("store_every", 1)), *pins])

    def _require_kept(self, k: int) -> None:
        if not self.is_kept(k):
            raise StoreError(
                f"{self.path} keeps every {self.store_every}th row and row {k} is not one of "
                "them; it is rebuilt by replay (`obliviate export --row`, obliviate.rows.Rows)."
            )

    def read(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """P_k (|theta|,) and its optimizer state (None when the recipe keeps none); row k must
        be kept (``obliviate.rows.Rows`` reads any row)."""
        theta, opt = self.read_raw(k)
        return self.shifted(k, theta), opt

    def read_raw(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Kept row k as written, without a stitching shift, and its optimizer state."""
        self._require_kept(k)
        opt = self.read_row(self.optimizer, k) if self.optimizer is not None else None
        return self.read_row(self.params, k), opt

    def read_params(self, k: int) -> np.ndarray:
        """P_k as the consistent store defines it: the stored row plus the stitching shift whose
        ranges cover k, if any. Shifts are compacted (see ``install_deletion``): at most one covers
        a row, so a read costs one row and at most one shift however many deletions happened."""
        self._require_kept(k)
        return self.shifted(k, self.read_row(self.params, k))

    def shift_index(self, k: int) -> int | None:
        """The row of the shift array that covers row k (compacted: at most one), if any."""
        covering = [s["index"] for s in self.meta.get("shifts", []) if _covers(s["ranges"], k)]
        return covering[0] if covering else None

    def shifted(self, k: int, theta: np.ndarray) -> np.ndarray:
        """Row k's stored (or replayed) values plus the stitching shift that covers k, if any."""
        if (i := self.shift_index(k)) is not None:
            shift = self.read_row(self.group["shifts"], i, of=k)
            theta = (theta.astype(np.float64) + shift).astype(np.float32)
        return theta

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
    def install_deletion(
        self,
        request_id: str,
        staged: Path,
        rows: range,
        shift: np.ndarray | None,
        fingerprint: str,
        reference_drop: list[int] = (),
        pins: list[int] = (),
        unshift: list[int] = (),
    ) -> None:
        """Install a deletion's staged rows; idempotent, so a crash can be redone.

        ``staged`` is a Zarr group laid out like this store (same codecs and chunks, see
        ``staging_group``) holding P'_k for k in ``rows`` and M' in the last row: its chunk files
        are moved into place, so installing costs renames, not a decode and re-encode.
        ``shift`` = P'_{d+t} - P_{d+t} (float64) applies lazily to rows d+t+1..B-1: they are not
        rewritten (at ResNet-50 scale that would take minutes); ``read`` adds it.
        ``reference_drop``: validation slots that leave; the guard's reference predictions for
        them are dropped (-1) in the same metadata write. A thinned store: ``pins`` are rows
        kept from now on (staged too), ``unshift`` rows whose staged value has its shift baked in.
        """
        self._move_staged(staged)
        meta = self.meta
        if meta.get("last_request") == request_id:  # a redo: the shifts are installed already
            return
        shifts = self._compacted_shifts(meta.get("shifts", []), rows, shift, request_id)
        for k in unshift:
            shifts = [{**s, "ranges": _remove_range(s["ranges"], k, k)} for s in shifts]
        shifts = [s for s in shifts if s["ranges"]]
        exact = frontier_after(self.exact_through, rows, self.exact_replay)
        approximate = [] if exact == self.n_blocks else self.approximate
        if exact < self.n_blocks and rows:
            entry = {"deletion": request_id, "committed": time.time(),
                     "first_block": rows.start, "stop_block": rows.stop - 1}  # fmt: skip
            approximate.append(entry)
        changes = {"shifts": shifts, "fingerprint": fingerprint, "last_request": request_id,
                   "exact_through": exact, "approximate": approximate,
                   "pinned": sorted({*meta.get("pinned", []), *pins}),
                   "exactness": EXACTNESS}  # fmt: skip
        if reference_drop and "reference" in meta:
            preds = list(meta["reference"]["val_predictions"])
            for slot in reference_drop:
                preds[slot] = -1
            changes["reference"] = {**meta["reference"], "val_predictions": preds}
        self.update_meta(**changes)

    def install_consolidation(
        self,
        txn_id: str,
        staged: Path,
        rows: range,
        reference: dict | None,
        pins: list[int] = (),
        unpin: list[int] = (),
    ) -> None:
        """Install a consolidation's staged rows (P_k and its optimizer state for k in ``rows``).
        Rows that run to B: every row is exact again, so the shifts go (their chunks too: a shift
        is P'_k - P_k, and P_k was trained with the samples deleted since) and the approximate
        deletions with them. ``reference``: the guard's yardstick from now on, the consolidated
        model's validation predictions. A prefix (rows K+1..m, m < B): they are exact, no shift
        covers them any more, and the rest (P_B included) stays as it was. Idempotent, so a
        crash can be redone."""
        self._move_staged(staged)
        meta = self.meta
        if meta.get("last_request") == txn_id:  # a redo: the metadata is written already
            self._drop_unkept(unpin)
            return
        if rows.stop - 1 < self.n_blocks:  # a prefix: rows K+1..m exact, P_B as it was
            shifts = [{**s, "ranges": _remove_range(s["ranges"], rows.start, rows.stop - 1)}
                      for s in meta.get("shifts", [])]  # fmt: skip
            pinned = sorted({*meta.get("pinned", []), *pins} - {*unpin})
            self.update_meta(shifts=[s for s in shifts if s["ranges"]], last_request=txn_id,
                             exact_through=rows.stop - 1, exactness=EXACTNESS,
                             pinned=pinned)  # fmt: skip
            self._drop_unkept(unpin)  # pinned meanwhile, exact now: replayed from the rows below
            return
        unpinned = meta.get("pinned", [])  # every row exact: the s-th rows replay all the rest
        changes = {"shifts": [], "last_request": txn_id, "exact_through": rows.stop - 1,
                   "approximate": [], "exactness": EXACTNESS, "pinned": []}  # fmt: skip
        if reference is not None:
            changes["reference"] = reference
        self.update_meta(**changes)
        if (self.path / "shifts").is_dir():  # unused from here on
            shutil.rmtree(self.path / "shifts" / "c", ignore_errors=True)
            self._shift_array(self.params.shape[1]).resize((0, self.params.shape[1]))
        self._drop_unkept([*unpinned, *unpin])

    def _drop_unkept(self, rows: list[int]) -> None:
        """Remove the chunks of rows the metadata no longer keeps (after it was written)."""
        for k in rows:
            if not self.is_kept(k):
                for name in ("params", "optimizer"):
                    shutil.rmtree(self.path / name / "c" / str(k), ignore_errors=True)

    def _move_staged(self, staged: Path) -> None:
        """Rename the chunk files of a staged Zarr group (laid out like this store) into it."""
        for name in ("params", "optimizer"):
            chunks = staged / name / "c"
            for src in sorted(chunks.rglob("*")) if chunks.is_dir() else []:
                if src.is_file():
                    dest = self.path / name / src.relative_to(staged / name)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dest)

    def _compacted_shifts(
        self, shifts: list[dict], rows: range, shift, request_id: str
    ) -> list[dict]:
        """The shift table after a deletion that rewrote ``rows`` and shifts the rows after them.

        Invariant: at most one shift covers a row. The new shift covers stop+1..B-1; where an
        older shift covers part of that, the part gets a new entry holding their sum. New sums go
        to array slots no current entry uses, so a crash before the metadata write changes
        nothing that ``read`` sees.
        """
        lo, hi = rows.stop, self.n_blocks - 1  # the rows the new shift covers
        out = []
        for s in shifts:
            s = {**s, "ranges": _remove_range(s["ranges"], rows.start, rows.stop - 1)}
            if shift is not None:
                s["ranges"] = _remove_range(s["ranges"], lo, hi)
            if s["ranges"]:
                out.append(s)
        if shift is None or lo > hi:
            return out
        arr = self._shift_array(len(shift))
        used = {s["index"] for s in shifts}  # what the metadata on disk still points at
        free = (i for i in itertools.count() if i not in used)
        uncovered = [[lo, hi]]
        for s in shifts:  # each older shift's part inside lo..hi: old + new in one entry
            part = [r for r in (_intersect(a, b, lo, hi) for a, b in s["ranges"]) if r]
            if not part:
                continue
            i = next(free)
            self._write_shift(arr, i, self.read_row(arr, s["index"]) + shift)
            out.append({"request": request_id, "index": i, "ranges": part})
            used.add(i)
            for a, b in part:
                uncovered = _remove_range(uncovered, a, b)
        if uncovered:
            i = next(free)
            self._write_shift(arr, i, shift)
            out.append({"request": request_id, "index": i, "ranges": uncovered})
        return out

    def _shift_array(self, width: int):
        arr = self.group.get("shifts")
        if arr is None:
            arr = self.group.create_array(
                "shifts",
                shape=(0, width),
                dtype="float64",
                chunks=(1, min(width, MAX_CHUNK_ELEMS)),
                compressors=compressors(),
                config=ARRAY_CONFIG,
            )
        return arr.with_config(ARRAY_CONFIG)

    @staticmethod
    def _write_shift(arr, i: int, values: np.ndarray) -> None:
        if arr.shape[0] <= i:
            arr.resize((i + 1, arr.shape[1]))
        arr[i] = values

    def staging_arrays(self, folder: Path) -> dict[str, zarr.Array]:
        """Empty arrays under ``folder`` with this store's arrays' metadata (codecs, chunks,
        shape), by name: rows written there have the chunk files ``install_deletion`` moves in."""
        self.require_local()
        folder.mkdir(parents=True)
        shutil.copy(self.path / "zarr.json", folder / "zarr.json")
        for name in ("params", "optimizer"):
            if (self.path / name / "zarr.json").is_file():
                (folder / name).mkdir()
                shutil.copy(self.path / name / "zarr.json", folder / name / "zarr.json")
        group = zarr.open_group(str(folder), mode="r+")
        return {name: arr.with_config(ARRAY_CONFIG) for name, arr in group.arrays()}

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
            "store_every": self.store_every,
            "kept_rows": len(self.kept_rows()),
            "exact_through": self.exact_through,
            "approximate_deletions": len(self.approximate),
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


def _intersect(a: int, b: int, lo: int, hi: int) -> list[int] | None:
    return [max(a, lo), min(b, hi)] if max(a, lo) <= min(b, hi) else None


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
