"""Tasks of the deletion flows (flows/deletion.py). Parameters, logs and artifacts carry request
ids, deletion ids and counts, never a sample id or sample content (Prefect keeps them in its
database)."""

from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from obliviate import deletion
from obliviate.config import Config
from tasks import NO_CACHE


@task(**NO_CACHE)
def drain(cfg: Config, request: str | None, wait: float | None) -> deletion.Drained:
    """Forget the queued requests (or only ``request``): ``obliviate.deletion.drain``."""
    out = deletion.drain(cfg, request, wait=wait)
    log = get_run_logger()
    if out.recovered:
        log.warning("finished deletion(s) a crash interrupted: %s", ", ".join(out.recovered))
    for e in out.refused:
        log.warning("request %s refused: %s", e["request_id"], e["reason"])
    for r in out.record["sweeps"] if out.record else []:
        log.info("deletion %s: retrained blocks %s..%s (t=%d, %s)", r["request_id"],
                 r["first_block"], r["stop_block"], r["t"], r["reason"])  # fmt: skip
    log.info("%d request(s) done, %d refused", len(out.done), len(out.refused))
    return out


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


@task(**NO_CACHE)
def summarize(cfg: Config, out: deletion.Drained) -> None:
    """The drain's summary table: one row per request it finished or refused."""
    from obliviate import lifecycle

    rows = [
        {"request": e["request_id"], "status": e["status"], "samples": e["n_samples"],
         "deletion": e.get("deletion") or "", "reason": e.get("reason") or ""}
        for e in [*out.done, *out.refused]
    ]  # fmt: skip
    left = lifecycle.counts(cfg)["queued"]
    create_table_artifact(
        rows or [{"request": "(no request queued)"}],
        key="drain",
        description=f"drain summary; queued requests left: {left}",
    )
