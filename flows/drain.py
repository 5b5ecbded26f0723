"""The drain flow: forget every queued deletion request in one sweep.

`obliviate serve` runs it as a Prefect deployment on a cron schedule; `obliviate drain` runs it
once. Its only parameter is the path of params.yaml, so the Prefect database holds no sample id.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from obliviate.config import load_config
from obliviate.transaction import State, new_request_id
from tasks import forget as f
from tasks import inbox as t


@flow(name="drain-inbox")
def drain_flow(params: str = "params.yaml") -> dict:
    cfg = load_config(Path(params))
    record, finished = None, []
    with State.of(cfg).lock():  # one writer at a time; an OS lock, freed if we are killed
        t.preflight(cfg)
        f.recover(cfg)
        t.reconcile(cfg)
        batch = t.claim(cfg)
        if batch.ids:
            deletion_id = new_request_id()
            t.mark_running(cfg, batch, deletion_id)
            f.journal(cfg, batch.ids, batch.force, deletion_id)
            record = f.execute(cfg, deletion_id, batch.ids, batch.force)
        finished = t.mark_done(cfg, batch)  # incl. requests whose ids were forgotten meanwhile
        if record is not None:  # the requests are done; the metrics follow, once per batch
            record["test_accuracy_after"] = f.refresh_metrics(cfg, deletion_id)["accuracy"]
    if record is not None:
        for r in record["sweeps"]:
            f.report(cfg, r)
        f.publish(cfg, record)
    t.publish(cfg, batch, finished)
    return {
        "deletion": None if record is None else deletion_id,
        "done": [e["request_id"] for e in finished],
        "refused": [e["request_id"] for e in batch.refused],
    }
