"""Tasks of the verify flow."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from obliviate import verify as v
from obliviate.config import Config
from tasks import NO_CACHE


@task(**NO_CACHE)
def run_gate(cfg: Config) -> dict:
    result = v.verify(cfg)
    get_run_logger().info(result["sentence"])
    return result


@task(**NO_CACHE)
def publish_verdict(result: dict) -> None:
    rows = [("original", result.get("rate_original")), ("served", result.get("rate_served")),
            ("naive", result.get("rate_naive"))]  # fmt: skip
    table = "| model | backdoor success |\n|---|---|\n" + "".join(
        f"| {name} | {rate:.1%} |\n" for name, rate in rows if rate is not None
    )
    text = f"### Verification: {result['status'].upper()}\n\n{result['sentence']}\n\n{table}"
    create_markdown_artifact(text, key="verification")


@task(**NO_CACHE)
def enforce(result: dict) -> None:
    """Fail the flow (and the CLI, and CI) when the gate does not support the deletion."""
    if not result["passed"]:
        raise v.VerificationFailed(result["sentence"])
