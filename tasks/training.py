"""Tasks of the training and evaluation flows."""

from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from obliviate import audit, evaluate, gate, train
from obliviate.config import Config
from obliviate.progress import block_progress
from obliviate.store import ParamStore
from tasks import NO_CACHE


@task(**NO_CACHE)
def stored_training(cfg: Config, overwrite: bool = False, allow_inexact: bool = False) -> dict:
    """Train every block not yet in the store (one task: per-block tasks would cost more than
    the blocks themselves at B=500) and return a summary of the store."""
    log = get_run_logger()
    n_blocks = cfg.prepare.blocks
    with block_progress("stored training", n_blocks) as advance:

        def on_block(k: int, n: int) -> None:
            advance(k, n)
            if k % max(1, n // 10) == 0 or k == n:
                log.info("block %d/%d stored", k, n)

        store = train.stored_training(cfg, overwrite, on_block, allow_inexact)
    return store.summary()


@task(**NO_CACHE)
def measure_original(cfg: Config) -> dict | None:
    """metrics/original.json: the freshly trained model's accuracy and backdoor rate. Skipped
    once deletions happened: the original model no longer exists then."""
    if audit.read_records(cfg.paths.audit):
        return None
    store = ParamStore.open(cfg.paths.store)
    trainer = train.Trainer.from_config(cfg)
    metrics = gate.measure_original(cfg, store.read_params(store.n_blocks), trainer)
    write_metrics.fn(cfg, metrics, "original")
    return metrics


@task(**NO_CACHE)
def publish_summary(summary: dict, key: str) -> None:
    """A Prefect table artifact, visible in the UI next to the flow run."""
    rows = [{"field": k, "value": str(v)} for k, v in summary.items()]
    create_table_artifact(rows, key=key, description=f"obliviate {key}")


@task(**NO_CACHE)
def evaluate_store(cfg: Config) -> dict:
    metrics = evaluate.evaluate_store(cfg)
    get_run_logger().info(
        "test accuracy %.4f on %d samples", metrics["accuracy"], metrics["n_test"]
    )
    return metrics


@task(retries=1, retry_delay_seconds=2, **NO_CACHE)
def write_metrics(cfg: Config, metrics: dict, name: str) -> str:
    cfg.paths.metrics.mkdir(parents=True, exist_ok=True)
    path = cfg.paths.metrics / f"{name}.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return str(path)
