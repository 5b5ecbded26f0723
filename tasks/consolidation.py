"""Tasks of the consolidate flow (flows/consolidation.py) and the drain's trigger."""

from __future__ import annotations

from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_table_artifact
from prefect.deployments import run_deployment

from obliviate import consolidation
from obliviate.config import Config
from tasks import NO_CACHE


@task(**NO_CACHE)
def consolidate(cfg: Config, if_due: bool, wait: float | None) -> dict:
    """Retrain from the first inexact row to B on the current blocks and install it."""
    out = consolidation.run(cfg, if_due, wait)
    get_run_logger().info(out["sentence"])
    return out


@task(**NO_CACHE)
def publish(out: dict) -> None:
    r = out["record"]
    rows = [{"field": k, "value": str(v)} for k, v in (
        ("consolidation", r["request_id"]), ("retrained blocks", f"{r['first_block']}.."
        f"{r['stop_block']}"), ("deletions made exact", len(r["exact_deletions"])),
        ("catch-up rounds", out["rounds"]), ("served model sha256", r["model_after"]),
        ("hash chain head", r["chain"]["head"]), ("test accuracy", out["accuracy"]))]  # fmt: skip
    create_table_artifact(rows, key="consolidation", description=f"consolidation {r['request_id']}")


@task(**NO_CACHE)
def start_if_due(cfg: Config, params: str) -> str | None:
    """After a drain, whose requests are done: when a trigger in params.yaml fires and this
    drain runs as the scheduled deployment, start a run of the consolidate deployment beside
    it (it computes without the writer lock, so the next requests do not wait for it). Returns
    the trigger's sentence (None: nothing due), for a drain run from the command line to act on.
    """
    reason = consolidation.due(cfg)
    if reason is None or runtime.deployment.id is None:
        return reason
    run_deployment(
        f"consolidate/{cfg.serve.deployment}",
        parameters={"params": params, "if_due": True},
        timeout=0,  # start it, do not wait for it
        as_subflow=False,
    )
    get_run_logger().info("consolidation started: %s", reason)
    return reason
