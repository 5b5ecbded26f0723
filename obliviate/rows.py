"""Any row P_k of a thinned store (``train.store_every`` s > 1), bit for bit.

A thinned store keeps P_0, P_B, every s-th row and any row a deletion had to pin (see
``ParamStore.is_kept``); the rows between are not on disk. Replay is exact, so a row that is not
kept is rebuilt from the nearest kept row below it by training the blocks in between, exactly
as stored training did: the bytes equal what a store with s = 1 holds. A row that a stitching
shift covers gets the shift added after the replay, as ``ParamStore.read_params`` adds it to a
stored row (shifts cover whole runs between kept rows, so the replayed run is the unshifted one).

``Rows`` remembers the last row it rebuilt, so reading k, k+1, k+2, ... in order costs one block
of training per row and O(|theta|) memory.
"""

from __future__ import annotations

import numpy as np

from obliviate.store import ParamStore
from obliviate.train import Trainer


class Rows:
    def __init__(self, store: ParamStore, trainer: Trainer):
        self.store = store
        self.trainer = trainer
        self._last: tuple[int, np.ndarray, np.ndarray | None] | None = None  # k, raw P_k, state

    def raw(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The row as stored training wrote it (no shift) and its optimizer state."""
        store = self.store
        if store.is_kept(k):
            return store.read_raw(k)
        base = store.base_of(k)
        if self._last is not None and base <= self._last[0] <= k:
            j, theta, opt = self._last
        else:
            j, (theta, opt) = base, store.read_raw(base)
        for i in range(j + 1, k + 1):
            t, o = self.trainer.run_block(i, theta, opt)
            theta, opt = t.numpy(), None if o is None else o.numpy()
        self._last = (k, theta, opt)
        return theta, opt

    def read(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """P_k as the store defines it (its shift added) and its optimizer state."""
        theta, opt = self.raw(k)
        return self.store.shifted(k, theta), opt

    def read_params(self, k: int) -> np.ndarray:
        return self.read(k)[0]
