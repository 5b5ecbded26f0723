"""SISA (Bourtoule et al., "Machine Unlearning"), the competitor, in the same harness.

The training set is split into S shards of R slices each (S*R = B, using obliviate's balanced
blocks: shard s holds blocks s*R+1..(s+1)*R, so the data and the block seeds are identical).
Each shard trains its own model on its slices in order, E epochs per slice (the same per-sample
budget as stored training), with the learning-rate schedule run over its own R slices, and a
checkpoint after every slice. A deletion retrains only the
affected shard, from the checkpoint before the affected slice. Prediction is a majority vote
of the S shard models (ties: the smallest class).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from obliviate.data import Samples
from obliviate.partition import load_block
from obliviate.train import Trainer, block_lr


@dataclass
class Sisa:
    shards: int
    slices: int
    checkpoints: list[list[tuple]]  # [shard][r] = (theta, opt) after slice r (r=0: P_0)

    def block_of(self, shard: int, r: int) -> int:
        """obliviate block number (1-based) of slice r (1-based) of a shard (0-based)."""
        return shard * self.slices + r

    def storage_bytes(self) -> int:
        return sum(
            t.nbytes + (0 if o is None else o.nbytes) for s in self.checkpoints for t, o in s
        )


def train_shard(trainer: Trainer, sisa: Sisa, shard: int, start: int, blocks: dict[int, Samples]):
    """(Re)train a shard from the checkpoint before slice ``start`` (1-based) to its last slice."""
    theta, opt = sisa.checkpoints[shard][start - 1]
    del sisa.checkpoints[shard][start:]
    for r in range(start, sisa.slices + 1):
        k = sisa.block_of(shard, r)
        block = blocks.get(k) or load_block(trainer.blocks_dir, k)
        lr = block_lr(trainer.recipe, r, sisa.slices)  # each shard runs the whole schedule
        theta, opt = trainer.train_samples(k, theta, opt, block, lr)
        theta, opt = theta.numpy(), None if opt is None else opt.numpy()
        sisa.checkpoints[shard].append((theta, opt))


def train_sisa(trainer: Trainer, shards: int) -> Sisa:
    if trainer.n_blocks % shards:
        raise ValueError(f"B={trainer.n_blocks} is not a multiple of S={shards}")
    theta0, opt0 = trainer.initial_state()
    init = (theta0.numpy(), None if opt0 is None else opt0.numpy())
    sisa = Sisa(shards, trainer.n_blocks // shards, [[init] for _ in range(shards)])
    for s in range(shards):
        train_shard(trainer, sisa, s, 1, {})
    return sisa


def forget_sisa(trainer: Trainer, sisa: Sisa, plan: dict[int, list[str]]) -> float:
    """Retrain every affected shard from its first affected slice; returns the seconds spent."""
    start = time.perf_counter()
    by_shard: dict[int, int] = {}
    reduced = {}
    for k, ids in plan.items():
        shard, r = (k - 1) // sisa.slices, (k - 1) % sisa.slices + 1
        by_shard[shard] = min(r, by_shard.get(shard, r))
        block = load_block(trainer.blocks_dir, k)
        reduced[k] = block.take(~np.isin(block.ids, ids))
    for shard, r in by_shard.items():
        train_shard(trainer, sisa, shard, r, reduced)
    return time.perf_counter() - start


def vote(
    trainer: Trainer, sisa: Sisa, x: np.ndarray, n_classes: int, batch_size: int
) -> np.ndarray:
    """Majority vote of the shard models: S forward passes per input."""
    from obliviate.predict import predict

    votes = np.zeros((len(x), n_classes), dtype=np.int64)
    for shard in sisa.checkpoints:
        pred = predict(trainer, shard[-1][0], x, batch_size)
        votes[np.arange(len(x)), pred] += 1
    return votes.argmax(1)
