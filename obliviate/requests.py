"""Deletion requests: parse, validate against the blocks and the audit, and plan by block.

Nothing changes until a request passes every check here. Requests carry sample ids only.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from obliviate.errors import RequestError, shown_id, shown_path
from obliviate.partition import INDEX, block_file, read_manifest


def read_request_file(path: Path) -> list[str]:
    """Ids from a JSON-lines file: each line a string (or an integer) or an object with an "id"
    key; ids are matched as text, as the blocks store them."""
    where = shown_path(path)
    try:
        if path.is_dir():
            raise RequestError(
                f"{where} is a folder, not a file; pass a JSON-lines file of sample ids."
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise RequestError(
            f"{where} does not exist; pass a JSON-lines file of sample ids."
        ) from None
    except OSError as exc:
        raise RequestError(
            f"{where} cannot be read ({exc.strerror or exc}); pass a readable JSON-lines file."
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        n = data[: exc.start].count(b"\n") + 1
        raise RequestError(f"{where}:{n} is not valid UTF-8; save the file as UTF-8.") from None
    ids = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise RequestError(f"{where}:{n} is not valid JSON; write one id per line.") from None
        sid = item.get("id") if isinstance(item, dict) else item
        if isinstance(sid, int) and not isinstance(sid, bool):  # a numeric id column's id
            sid = str(sid)
        if not isinstance(sid, str) or not sid.strip():
            raise RequestError(f'{where}:{n} has no sample id; write "id" or {{"id": "id"}}.')
        ids.append(sid)
    if not ids:
        raise RequestError(f"{where} holds no sample ids; add one per line.")
    return ids


def check_ids(ids: list[str]) -> None:
    """Refuse an id no sample can have: empty, or not text (argv bytes that are not UTF-8)."""
    for sid in ids:
        if not sid.strip():
            raise RequestError("the request names an empty sample id; drop it or name the sample.")
        try:
            sid.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(
                f"sample id {shown_id(sid)} is not valid UTF-8; name the sample by its id as "
                "`obliviate ids` prints it."
            ) from None


@dataclass(frozen=True)
class SampleIndex:
    ids: np.ndarray  # (N,) every sample id in the blocks and the validation split
    block: np.ndarray  # (N,) its block, 1-based; 0 for the validation split
    label: np.ndarray  # (N,)

    @classmethod
    def of(cls, blocks_dir: Path) -> SampleIndex:
        if (blocks_dir / INDEX).is_file():
            with np.load(blocks_dir / INDEX, allow_pickle=False) as z:
                return cls(z["ids"], z["block"], z["label"])
        return cls.scan(blocks_dir)

    @classmethod
    def scan(cls, blocks_dir: Path) -> SampleIndex:
        """Read the ids from every block file (the index file is a cache of this)."""
        n_blocks = read_manifest(blocks_dir)["n_blocks"]
        ids, blocks, labels = [], [], []
        for k in range(n_blocks + 1):
            if not (blocks_dir / block_file(k)).is_file():  # no validation split
                continue
            with np.load(blocks_dir / block_file(k), allow_pickle=False) as z:
                ids.append(z["ids"])
                labels.append(z["y"])
            blocks.append(np.full(len(ids[-1]), k))
        return cls(np.concatenate(ids), np.concatenate(blocks), np.concatenate(labels))

    def without(self, ids: list[str]) -> SampleIndex:
        keep = ~np.isin(self.ids, ids)
        return SampleIndex(self.ids[keep], self.block[keep], self.label[keep])


def plan_deletion(
    ids: list[str], blocks_dir: Path, forgotten: Container[str], force: bool = False
) -> dict[int, list[str]]:
    """Validate a request and group its ids by block: {block: [ids]}; RequestError if unsafe.

    ``forgotten``: what the audit has forgotten (``audit.Forgotten.of(cfg)``), tested by raw id.
    Block 0 is the validation split: its samples are dropped from it, and nothing retrains.
    """
    if not ids:
        raise RequestError("the request names no sample ids; pass at least one.")
    check_ids(ids)
    dupes = sorted(i for i, c in Counter(ids).items() if c > 1)
    if dupes:
        raise RequestError(f"the request repeats {_names(dupes)}; name each sample once.")
    already = [i for i in ids if i in forgotten]
    if already:
        raise RequestError(f"{_names(already)} already forgotten; drop them from the request.")
    index = SampleIndex.of(blocks_dir)
    pos = {sid: i for i, sid in enumerate(index.ids)}
    unknown = [i for i in ids if i not in pos]
    if unknown:
        raise RequestError(
            f"unknown sample id(s) {_names(unknown)}; check the ids (see the blocks)."
        )
    rows = np.array([pos[i] for i in ids])
    if not force:
        _refuse_unsafe(index, rows)
    plan: dict[int, list[str]] = {}
    for sid, r in zip(ids, rows, strict=True):
        plan.setdefault(int(index.block[r]), []).append(sid)
    return dict(sorted(plan.items()))


def refuse_unsafe_together(ids: list[str], blocks_dir: Path, force: bool) -> None:
    """RequestError if removing all of ``ids`` (each known, and valid alone) at once is unsafe:
    it would empty a block or the validation split, or remove a whole class (unless ``force``)."""
    if force:
        return
    index = SampleIndex.of(blocks_dir)
    _refuse_unsafe(index, np.flatnonzero(np.isin(index.ids, ids)))


def _refuse_unsafe(index: SampleIndex, rows: np.ndarray) -> None:
    removed_per_block = Counter(index.block[rows].tolist())
    sizes = Counter(index.block.tolist())
    emptied = sorted(b for b, n in removed_per_block.items() if n >= sizes[b])
    if 0 in emptied:
        raise RequestError(
            "the request would empty the validation split the accuracy guard judges on; "
            "pass --force to allow it."
        )
    if emptied:
        raise RequestError(f"the request would empty block(s) {emptied}; pass --force to allow it.")
    trained = rows[index.block[rows] > 0]  # the validation split is not training data
    removed_per_class = Counter(index.label[trained].tolist())
    totals = Counter(index.label[index.block > 0].tolist())
    wiped = sorted(int(c) for c, n in removed_per_class.items() if n >= totals[c])
    if wiped:
        raise RequestError(
            f"the request would remove every sample of class(es) {wiped}; pass --force to allow it."
        )


def _names(ids: list[str], limit: int = 5) -> str:
    shown = ", ".join(shown_id(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
