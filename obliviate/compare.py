"""Naive unlearning, the reference: retrain all blocks from P_0 on the current (reduced) blocks
with the same recipe and seeds, then compare with the served model."""

from __future__ import annotations

import time

from obliviate.audit import read_records
from obliviate.config import Config
from obliviate.evaluate import test_predictions
from obliviate.hashing import model_hash
from obliviate.partition import load_samples
from obliviate.store import ParamStore
from obliviate.train import Trainer, stored_training


def naive_config(cfg: Config) -> Config:
    paths = cfg.paths.model_copy(update={"store": cfg.paths.naive_store})
    return cfg.model_copy(update={"paths": paths})


def last_deletion_seconds(records: list[dict]) -> float | None:
    """Compute time (accepted to staged) of the last deletion that retrained anything, all of its
    planned sweeps added up; None when no deletion retrained."""
    retrained = [r for r in records if r.get("retrained_blocks")]
    if not retrained:
        return None
    plan = retrained[-1].get("sweep_plan")
    sweeps = [r for r in retrained if plan and (r.get("sweep_plan") or {}).get("request")
              == plan["request"]] or retrained[-1:]  # fmt: skip
    return sum(r["timings_s"]["compute"] for r in sweeps)


def compare_with_naive(cfg: Config) -> dict:
    start = time.perf_counter()
    naive = stored_training(naive_config(cfg), overwrite=True)
    naive_s = time.perf_counter() - start
    served = ParamStore.open(cfg.paths.store)
    trainer = Trainer.from_config(cfg)
    y = load_samples(cfg.paths.test).y
    naive_theta, served_theta = (
        naive.read_params(naive.n_blocks),
        served.read_params(served.n_blocks),
    )
    p_naive = test_predictions(cfg, trainer, naive_theta)
    p_served = test_predictions(cfg, trainer, served_theta)
    records = read_records(cfg.paths.audit)
    return {
        "naive_sha256": model_hash(naive_theta),
        "served_sha256": model_hash(served_theta),
        "served_exact_through": served.exact_through,
        "blocks": naive.n_blocks,
        "naive_s": naive_s,
        "naive_accuracy": float((p_naive == y).mean()),
        "served_accuracy": float((p_served == y).mean()),
        "consistency": float((p_naive == p_served).mean()),
        "last_deletion_s": last_deletion_seconds(records),
    }
