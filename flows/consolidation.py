"""The consolidate flow: make every deletion exact (`obliviate consolidate`, the scheduled
`consolidate` deployment that `obliviate serve` runs on consolidate.cron, and the run a drain
starts when a trigger in params.yaml fires). Its parameters are the path of params.yaml and
whether to run only when a trigger fires."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from obliviate.config import load_config
from tasks import consolidation as t


@flow(name="consolidate")
def consolidate_flow(params: str = "params.yaml", if_due: bool = False,
                     wait: float | None = None) -> dict:  # fmt: skip
    """``wait``: seconds to wait for the writer lock each time it is needed (None, the
    deployment: as long as it takes)."""
    cfg = load_config(Path(params))
    out = t.consolidate(cfg, if_due, wait)
    if out["record"] is not None:
        t.publish(out)
    return out
