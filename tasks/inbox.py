"""Tasks of the drain flow. Parameters and logs carry request ids and counts, never sample ids."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from obliviate import inbox
from obliviate.config import Config
from tasks import NO_CACHE


@task(**NO_CACHE)
def preflight(cfg: Config) -> None:
    """A local, complete store, or one sentence and the requests stay queued."""
    inbox.preflight(cfg)


@task(**NO_CACHE)
def reconcile(cfg: Config) -> int:
    """Requests a killed drain left running: done if their deletion landed, else queued again."""
    changed = inbox.reconcile(cfg)
    for e in changed:
        get_run_logger().warning("request %s was interrupted; now %s", e["request_id"], e["status"])
    return len(changed)


@task(**NO_CACHE)
def claim(cfg: Config) -> inbox.Batch:
    batch = inbox.claim(cfg)
    log = get_run_logger()
    for e in batch.refused:
        log.warning("request %s refused: %s", e["request_id"], e["reason"])
    log.info("%d request(s) accepted, %d sample(s) in one sweep",
             len(batch.accepted), len(batch.ids))  # fmt: skip
    return batch


@task(**NO_CACHE)
def mark_running(cfg: Config, batch: inbox.Batch, deletion_id: str) -> None:
    """Before the deletion is journaled, so a crash at any point can be reconciled; and only
    once the rows and blocks the deletion reads are intact (checked after recovery, which may
    leave blocks and manifest apart for a moment): else StoreError, the requests stay queued."""
    from obliviate.deletion import validate

    if batch.ids:
        validate(cfg, batch.ids, batch.force)
    inbox.mark_running(cfg, batch, deletion_id)


@task(**NO_CACHE)
def mark_done(cfg: Config, batch: inbox.Batch) -> list[dict]:
    return inbox.mark_done(cfg, batch)


@task(**NO_CACHE)
def publish(cfg: Config, batch: inbox.Batch, finished: list[dict]) -> None:
    """The drain's summary table: one row per request it finished or refused."""
    rows = [
        {"request": e["request_id"], "status": e["status"], "samples": e["n_samples"],
         "deletion": e.get("deletion") or "", "reason": e.get("reason") or ""}
        for e in [*finished, *batch.refused]
    ]  # fmt: skip
    left = inbox.counts(cfg)["queued"]
    create_table_artifact(
        rows or [{"request": "(inbox empty)"}],
        key="drain-inbox",
        description=f"drain summary; queued requests left: {left}",
    )
