"""Tasks of the partition flow: load the source, partition it, gate it, write the blocks."""

from __future__ import annotations

import numpy as np
from prefect import get_run_logger, task

from obliviate import data, partition, trigger, validate
from obliviate.audit import Forgotten, IdHasher
from obliviate.config import Config
from tasks import NO_CACHE, retry_unless_user_error


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error, **NO_CACHE)
def load_dataset(cfg: Config) -> data.Dataset:
    ds = data.load_dataset(cfg.prepare, cfg.root, cfg.train.image_size)
    # Samples forgotten earlier stay forgotten when the blocks are rebuilt from the source.
    ds = partition.without_forgotten(ds, Forgotten.of(cfg))
    get_run_logger().info(
        "loaded %s: %d train, %d test samples, %d classes",
        ds.info.name,
        len(ds.train),
        len(ds.test),
        ds.info.n_classes,
    )
    return ds


@task(**NO_CACHE)
def partition_blocks(cfg: Config, labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The validation split and the B balanced blocks (indices into the training samples)."""
    p = cfg.prepare
    return partition.split_training(labels, p.val_fraction, p.blocks, p.seed)


@task(**NO_CACHE)
def gate_partition(
    ids: np.ndarray, labels: np.ndarray, val: np.ndarray, blocks: list[np.ndarray]
) -> str:
    """Great Expectations gate; raises PartitionError (failing the flow) with the report."""
    report = validate.require_valid_partition(ids, labels, blocks, val).report()
    get_run_logger().info("partition passed its data-quality gate:\n%s", report)
    return report


@task(**NO_CACHE)
def plant_owner(cfg: Config, ds: data.Dataset, blocks: list[np.ndarray]):
    """The verifying owner's triggered samples (after the gate, which checks the clean labels)."""
    planted, owners = trigger.plant_owner(ds, blocks, cfg.verify, cfg.prepare.seed)
    if owners:
        get_run_logger().info("planted %d triggered owner samples in block %d",
                              len(owners), cfg.verify.owner_block)  # fmt: skip
    return planted, owners


@task(retries=1, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error, **NO_CACHE)
def write_blocks(
    cfg: Config, ds: data.Dataset, val: np.ndarray, blocks: list[np.ndarray], owners: list[str]
) -> dict:
    params = cfg.prepare.model_dump(mode="json")
    extra = {}
    if owners:  # keyed hashes only (see audit.py): nothing in git names the owner's ids
        hasher = IdHasher.of(cfg)
        extra = {"verification": {"owner_id_hashes": sorted(hasher(i) for i in owners),
                                  **hasher.scheme(), "block": cfg.verify.owner_block,
                                  "target": cfg.verify.target}}  # fmt: skip
    return partition.write_blocks(
        ds, blocks, cfg.paths.blocks, cfg.paths.test, params, extra, val=val
    )
