"""The forget flow: recover, validate, journal, retrain with the DFA stop, stage, apply."""

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
        t.retrain_and_stage(cfg, request_id, ids, force)
        record = t.apply(cfg, request_id)
    t.report(cfg, record)
    t.publish(cfg, record)
    return record
