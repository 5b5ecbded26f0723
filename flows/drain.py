"""The forget flow: every deletion request, direct or queued, runs through it.

`obliviate forget` queues its ids and runs it for that one request; `obliviate drain` runs it
for every queued request; `obliviate serve` runs it as a Prefect deployment on a cron schedule.
Its parameters are the path of params.yaml and a request id, so the Prefect database holds no
sample id.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from obliviate.config import load_config
from tasks import forget as t


@flow(name="drain-inbox")
def drain_flow(
    params: str = "params.yaml", request: str | None = None, wait: float | None = None
) -> dict:
    """``wait``: seconds to wait for another writer (None, the deployment: as long as it takes)."""
    cfg = load_config(Path(params))
    out = t.drain(cfg, request, wait)  # under the writer lock; the metrics follow, once per drain
    if out.record is not None:  # evidence for people, after the commit
        for r in out.record["sweeps"]:
            t.report(cfg, r)
        t.publish(cfg, out.record)
    t.summarize(cfg, out)
    return {
        "deletion": None if out.record is None else out.record["request_id"],
        "record": out.record,
        "recovered": out.recovered,
        "done": [e["request_id"] for e in out.done],
        "refused": [e["request_id"] for e in out.refused],
        "seconds": out.seconds,  # by phase (obliviate.deletion.Drained)
        "committed_unix": out.committed_unix,
    }
