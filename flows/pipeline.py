"""The stored-training pipeline: partition -> stored training -> evaluation.

Each stage is its own flow (and its own DVC stage); `pipeline` chains them for one-shot runs.
"""

from __future__ import annotations

from prefect import flow

from obliviate.config import Config
from obliviate.transaction import State
from tasks import data, training


@flow(name="partition", log_prints=True)
def partition_flow(cfg: Config) -> dict:
    ds = data.load_dataset(cfg)
    val, blocks = data.partition_blocks(cfg, ds.train.y)
    data.gate_partition(ds.train.ids, ds.train.y, val, blocks)
    planted, owners = data.plant_owner(cfg, ds, blocks)
    with State.of(cfg).lock():  # blocks change: one writer at a time (see forget)
        manifest = data.write_blocks(cfg, planted, val, blocks, owners)
    summary = {
        "dataset": ds.info.name,
        "blocks": manifest["n_blocks"],
        "train_samples": manifest["n_samples"],
        "validation_samples": manifest["validation"]["n"],
        "test_samples": len(ds.test),
    }
    training.publish_summary(summary, key="partition")
    return summary


@flow(name="stored-training")
def train_flow(cfg: Config, overwrite: bool = False, allow_inexact: bool = False) -> dict:
    with State.of(cfg).lock():  # the store changes: one writer at a time (see forget)
        summary = training.stored_training(cfg, overwrite, allow_inexact)
        original = training.measure_original(cfg)
    training.publish_summary(summary, key="stored-training")
    return {**summary, "original": original}


@flow(name="evaluate")
def evaluate_flow(cfg: Config) -> dict:
    metrics = training.evaluate_store(cfg)
    training.write_metrics(cfg, metrics, "evaluate")
    training.publish_summary(metrics, key="evaluate")
    return metrics


@flow(name="pipeline")
def pipeline_flow(cfg: Config, overwrite: bool = False) -> dict:
    partition_flow(cfg)
    train_flow(cfg, overwrite)
    return evaluate_flow(cfg)
