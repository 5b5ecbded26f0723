"""The deletion flows: `forget` (one request, run by `obliviate forget` right after it queues the
ids) and `drain` (every queued request: `obliviate drain`, and the scheduled deployment that
`obliviate serve` runs). Both run the one orchestration, ``obliviate.deletion.drain``.

Their parameters are the path of params.yaml and a request id, so Prefect's database holds no
sample id.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from obliviate.config import load_config
from obliviate.deletion import Drained
from tasks import consolidation
from tasks import deletion as t


@flow(name="forget")
def forget_flow(params: str, request: str, wait: float | None = None) -> Drained:
    """Drain one request (and queued ones its ids cover) now; ``wait``: seconds to wait for
    another writer."""
    return _drain(params, request, wait)


@flow(name="drain")
def drain_flow(params: str = "params.yaml", wait: float | None = None) -> Drained:
    """Drain every queued request; ``wait``: seconds to wait for another writer (None, the
    deployment: as long as it takes)."""
    return _drain(params, None, wait)


def _drain(params: str, request: str | None, wait: float | None) -> Drained:
    cfg = load_config(Path(params))
    out = t.drain(cfg, request, wait)  # under the writer lock, the metric refresh last
    if out.record is not None:  # evidence for people, after the commit
        for r in out.record["sweeps"]:
            t.report(cfg, r)
        t.publish(cfg, out.record)
    t.summarize(cfg, out)
    out.consolidation_due = consolidation.start_if_due(cfg, params)  # after the requests
    return out
