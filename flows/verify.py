"""The verify flow: the backdoor-based gate on the served model; fails when deletion is not
supported, so a deployment or CI run goes red."""

from __future__ import annotations

from prefect import flow

from obliviate.config import Config
from tasks import training
from tasks import verify as t


@flow(name="verify")
def verify_flow(cfg: Config) -> dict:
    result = t.run_gate(cfg)
    training.write_metrics(cfg, result, "verify")
    t.publish_verdict(result)
    t.enforce(result)
    return result
