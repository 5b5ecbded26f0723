"""The forget flow: recover, validate, journal, retrain with the DFA stop, stage, apply, then
refresh the test metric and the verification verdict."""

from __future__ import annotations

from prefect import flow

from obliviate.config import Config
from obliviate.transaction import State
from tasks import forget as t


@flow(name="forget")
def forget_flow(cfg: Config, ids: list[str], force: bool = False) -> dict:
    with State.of(cfg).lock():  # one writer at a time; an OS lock, freed if we are killed
        t.recover(cfg)
        t.validate(cfg, ids, force)
        request_id = t.journal(cfg, ids, force)
        record = t.execute(cfg, request_id, ids, force)
        record["test_accuracy_after"] = t.refresh_metrics(cfg, request_id)["accuracy"]
    for r in record["sweeps"]:
        t.report(cfg, r)
    t.publish(cfg, record)
    return record
