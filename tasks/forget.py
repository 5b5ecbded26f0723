"""Tasks of the forget flow. Parameters are sample ids and request ids, never sample contents
(Prefect keeps parameters in its database)."""

from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from obliviate import deletion
from obliviate import transaction as txn
from obliviate.config import Config
from tasks import NO_CACHE


@task(**NO_CACHE)
def recover(cfg: Config) -> list[str]:
    """Finish deletions a crash interrupted, before anything new starts."""
    done = deletion.recover(cfg)
    if done:
        get_run_logger().warning("recovered interrupted deletion(s): %s", ", ".join(done))
    return done


@task(**NO_CACHE)
def validate(cfg: Config, ids: list[str], force: bool) -> dict[int, list[str]]:
    """Refuse unknown, duplicated, already forgotten or unsafe requests before anything changes."""
    return deletion.validate(cfg, ids, force)


@task(**NO_CACHE)
def journal(cfg: Config, ids: list[str], force: bool, request_id: str | None = None) -> str:
    request_id = request_id or txn.new_request_id()
    txn.journal_request(txn.State.of(cfg), request_id, ids, force)
    get_run_logger().info("request %s accepted: %d sample(s)", request_id, len(ids))
    return request_id


@task(**NO_CACHE)
def execute(cfg: Config, request_id: str, ids: list[str], force: bool) -> dict:
    """Retrain with the residual-memory stop, stitch, judge, stage and apply: one transaction
    per planned sweep (store, blocks, audit, DVC/git commit, cache purge)."""
    entry = {"request_id": request_id, "ids": ids, "force": force}
    record = deletion.execute(cfg, entry)
    for r in record["sweeps"]:
        get_run_logger().info(
            "deletion %s: retrained blocks %s..%s (t=%d, %s)",
            r["request_id"],
            r["first_block"],
            r["stop_block"],
            r["t"],
            r["reason"],
        )
    return record


@task(**NO_CACHE)
def refresh_metrics(cfg: Config, after: str) -> dict:
    """Test accuracy and the verification verdict of the new served model, versioned; after the
    deletion is committed, so they cannot delay or break it."""
    return deletion.refresh_metrics(cfg, after)


@task(**NO_CACHE)
def report(cfg: Config, record: dict) -> str | None:
    """Draw the residual-memory plot; after the commit, so it cannot delay or break it."""
    png = deletion.report(cfg, record)
    return None if png is None else str(png)


@task(**NO_CACHE)
def publish(cfg: Config, record: dict) -> None:
    rows = [
        {"field": k, "value": str(record[k])}
        for k in (
            "request_id",
            "blocks",
            "first_block",
            "stop_block",
            "t",
            "reason",
            "epsilon",
            "val_accuracy_after",
            "test_accuracy_after",
            "model_before",
            "model_after",
            "versioned",
            "remote_purge",
            "remote_purge_error",
        )
        if k in record
    ]
    create_table_artifact(rows, key="deletion", description=f"deletion {record['request_id']}")
    if not record["deltas"]:
        return
    png = cfg.paths.reports / f"{record['request_id']}.png"
    deltas = ", ".join(f"{d:.4g}" for d in record["deltas"])
    create_markdown_artifact(
        f"### Residual memory of {record['request_id']}\n\nDelta series: {deltas}\n\nPlot: `{png}`",
        key="deletion-delta",
    )
    create_link_artifact(png.as_uri(), link_text=f"Delta plot of {record['request_id']}",
                         key="deletion-delta-plot")  # fmt: skip
    verdict = cfg.paths.metrics / "verify.json"  # refreshed by the deletion for the new model
    if verdict.is_file():
        v = json.loads(verdict.read_text())
        create_markdown_artifact(
            f"### Verification after {record['request_id']}: {v['status'].upper()}\n\n"
            f"{v['sentence']}",
            key="verification",
        )
