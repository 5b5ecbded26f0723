"""Verification by replay: recompute rows of the store and compare their bytes (`obliviate
replay`, the auditor's check).

Stored training is a pure function of (P_{k-1}, its optimizer state, block k, the recipe, k), and
a replay on the same kind of device reproduces it bit for bit. So an exact row (rows 0..K of the
store, ``ParamStore.exact_through``) can be checked by recomputing it:

- ``every``: P_0 from the seed (or the init file), then every row from the row it replayed: a
  naive retrain on the blocks as they are, compared row by row with the store;
- ``sample``: rows drawn at random, each replayed from its stored predecessor: one block of
  training per row, a spot check;
- ``rows``: named rows, each from its stored predecessor.

The last consolidation's audit record holds a hash chain: every row's sha256 and every block's
sha256 when it was made. Rows whose blocks are still those are compared with it too, so a row
or a block changed after the fact is named even where no replay runs.

What a passing check shows: the rows are what training these blocks, in this order, with this
recipe, from this P_0, produces, on this device class (the kernels must be the same ones: CPU
and each GPU model round differently, so replay on another class is refused); with the blocks'
contents (the audit says which keyed ids left them) it shows the served model was trained on
data without the forgotten samples. What it does not show: that the block files themselves are
honest copies of the source data minus the deleted samples (trust in the blocks: the manifest's
sha256s, DVC's history and the keyed audit are the evidence for that), nor anything about the
approximate rows after K until a consolidation makes them exact.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from obliviate.audit import read_records
from obliviate.compat import require_same_device, require_same_model, store_fingerprint
from obliviate.config import Config
from obliviate.errors import StoreError
from obliviate.hashing import row_hash
from obliviate.partition import read_manifest
from obliviate.rows import Rows
from obliviate.store import ParamStore
from obliviate.train import Trainer


@dataclass
class Replayed:
    """What a replay checked: the rows replayed, the first that differed (with why), the
    rows compared with the last consolidation's chain, and where the store stops being exact."""

    exact_through: int
    n_blocks: int
    checked: list[int] = field(default_factory=list)
    differing: list[tuple[int, str]] = field(default_factory=list)
    chain: str | None = None  # the consolidation whose chain was compared
    chain_rows: int = 0

    @property
    def passed(self) -> bool:
        return not self.differing


def replay(
    cfg: Config,
    every: bool = False,
    sample: int = 0,
    rows: list[int] = (),
    seed: int | None = None,
    on_row: Callable[[int], None] | None = None,
) -> Replayed:
    """Replay rows of the store and compare their bytes (see the module docstring)."""
    store = ParamStore.open(cfg.paths.store)
    store.require_complete()
    if store.meta["fingerprint"] != store_fingerprint(cfg):
        raise StoreError(
            f"{store.path} was not built from params.yaml and the blocks as they are; replay "
            "checks a store against the params and blocks it was built with."
        )
    trainer = Trainer.from_config(cfg)
    require_same_device(store, trainer, allow_inexact=False)
    require_same_model(store, trainer)
    k_exact, n = store.exact_through, store.n_blocks
    out = Replayed(k_exact, n)
    wanted = sorted(set(rows))
    late = [k for k in wanted if not 0 <= k <= n]
    if late:
        raise StoreError(f"row {late[0]} is not a row of {store.path}; name rows 0..{n}.")
    approximate = [k for k in wanted if k > k_exact]
    if approximate:
        raise StoreError(
            f"row {approximate[0]} is approximate (the store is exact through row {k_exact}): "
            "only exact rows replay; run `obliviate consolidate` first."
        )
    thinned = [k for k in wanted if not store.is_kept(k)]
    if thinned:
        raise StoreError(
            f"row {thinned[0]} is not kept in {store.path} (train.store_every: "
            f"{store.store_every}), so no stored bytes compare with its replay; name kept rows "
            f"(0, {store.store_every}, {2 * store.store_every}, ..., {n})."
        )
    if sample:
        pool = [k for k in range(1, k_exact + 1) if store.is_kept(k)]
        wanted = sorted(set(wanted) | set(random.Random(seed).sample(pool, min(sample, len(pool)))))
    _check_chain(cfg, store, out, None if every else wanted)
    if every:
        theta, opt = trainer.initial_state()
        theta, opt = theta.numpy(), None if opt is None else opt.numpy()
        _compare(store, 0, theta, opt, out)
        for k in range(1, k_exact + 1):
            theta, opt = trainer.run_block(k, theta, opt)
            theta, opt = theta.numpy(), None if opt is None else opt.numpy()
            if store.is_kept(k):  # a thinned store holds nothing to compare the others with
                _compare(store, k, theta, opt, out)
            if on_row:
                on_row(k)
        return out
    rows = Rows(store, trainer)
    for k in wanted:
        if k == 0:
            theta, opt = trainer.initial_state()
        else:
            try:  # a row between kept ones: replayed from the kept row below it
                previous = store.read(k - 1) if store.is_kept(k - 1) else rows.read(k - 1)
            except StoreError as exc:  # a damaged predecessor: named, nothing replays from it
                out.differing.append((k - 1, str(exc)))
                continue
            theta, opt = trainer.run_block(k, *previous)
        _compare(store, k, theta.numpy(), None if opt is None else opt.numpy(), out)
        if on_row:
            on_row(k)
    return out


def _compare(store: ParamStore, k: int, theta: np.ndarray, opt, out: Replayed) -> None:
    out.checked.append(k)
    try:
        stored, stored_opt = store.read(k)
    except StoreError as exc:
        out.differing.append((k, str(exc)))
        return
    for what, a, b in (("parameters", theta, stored), ("optimizer state", opt, stored_opt)):
        if a is None and b is None:
            continue
        same = (
            a is not None
            and b is not None
            and np.array_equal(
                np.ascontiguousarray(a, "<f4").view("<u4"),
                np.ascontiguousarray(b, "<f4").view("<u4"),
            )
        )
        if not same:
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            out.differing.append(
                (
                    k,
                    f"its {what} differ from their replay in {int((diff > 0).sum())} value(s), "
                    f"by up to {diff.max():.3g}",
                )
            )
            return


def _check_chain(cfg: Config, store: ParamStore, out: Replayed, only: list[int] | None) -> None:
    """Compare the rows (``only`` these, else all) and their blocks with the last
    consolidation's chain, as far as the blocks are still those it recorded (a deletion since
    changed the rest)."""
    records = read_records(cfg.paths.audit)
    made = [i for i, r in enumerate(records) if r.get("chain")]  # full consolidations
    if not made:
        return
    out.chain, chain = records[made[-1]]["request_id"], records[made[-1]]["chain"]
    blocks = [b["sha256"] for b in read_manifest(cfg.paths.blocks)["blocks"]]
    changed = {int(k) for r in records[made[-1] + 1 :] for k in r.get("blocks", []) if int(k) > 0}
    limit = min([*changed, store.n_blocks + 1]) - 1
    last = min(limit, store.exact_through)  # rows before the first block changed since
    for k in range(last + 1) if only is None else [k for k in only if k <= last]:
        if not store.is_kept(k):  # train.store_every: no stored bytes to hash
            continue
        if k > 0 and blocks[k - 1] != chain["blocks"][k - 1]:
            out.differing.append(
                (
                    k,
                    f"block {k} is not the block consolidation {out.chain} recorded "
                    f"(sha256 {blocks[k - 1][:12]}, recorded {chain['blocks'][k - 1][:12]})",
                )
            )
            return
        try:
            stored = row_hash(*store.read(k))
        except StoreError as exc:
            out.differing.append((k, str(exc)))
            return
        if stored != chain["rows"][k]:
            out.differing.append((k, f"its bytes are not the row consolidation {out.chain} "
                                     "recorded (sha256 differs)"))  # fmt: skip
            return
        out.chain_rows += 1
