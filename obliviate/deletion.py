"""A deletion end to end: validate, journal, retrain with the stop rule, stage, apply.

The Prefect forget flow runs the same steps as tasks; ``forget`` here is the plain-Python path
(used by recovery and the tests).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from obliviate import transaction as txn
from obliviate.audit import Forgotten, IdHasher, file_digest
from obliviate.config import Config
from obliviate.errors import StoreError
from obliviate.evaluate import accuracy
from obliviate.faults import crashpoint
from obliviate.forget import sweep
from obliviate.fsck import preflight
from obliviate.objectstore import require_local
from obliviate.partition import read_manifest
from obliviate.plots import plot_deltas
from obliviate.requests import plan_deletion
from obliviate.stoprule import StopRule
from obliviate.store import ParamStore
from obliviate.train import Trainer
from obliviate.verify import owner_hashes, verify


def model_hash(theta: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(theta, dtype="<f4").tobytes()).hexdigest()


def stop_rule(cfg: Config) -> StopRule:
    f = cfg.forget
    return StopRule(f.epsilon, f.min_blocks, f.max_blocks, f.method)


def accuracy_guard(cfg: Config, trainer: Trainer, plan: dict, served: np.ndarray):
    """forget.max_accuracy_drop as a predicate on M': its accuracy on forget.guard_samples
    training samples, from up to 20 blocks spread over the run that the request does not touch,
    must stay within the drop of the served model's. Training samples, so that the test set
    stays unseen."""
    from obliviate.evaluate import predict
    from obliviate.models import load_flat
    from obliviate.partition import load_block

    drop = cfg.forget.max_accuracy_drop
    if drop is None:
        return None
    untouched = [k for k in range(1, trainer.n_blocks + 1) if k not in plan]
    if not untouched:
        return None
    picks = np.unique(np.linspace(0, len(untouched) - 1, min(20, len(untouched))).astype(int))
    per_block = -(-cfg.forget.guard_samples // len(picks))  # spread over the run
    blocks = [load_block(cfg.paths.blocks, untouched[i]) for i in picks]
    xs, ys = [b.x[:per_block] for b in blocks], [b.y[:per_block] for b in blocks]
    x = np.concatenate(xs)[: cfg.forget.guard_samples]
    y = np.concatenate(ys)[: cfg.forget.guard_samples]

    def acc(theta: np.ndarray) -> float:
        load_flat(trainer.model, torch.as_tensor(theta))
        return float(
            (predict(trainer.model, x, trainer.to_inputs, cfg.evaluate.batch_size) == y).mean()
        )

    floor = acc(served) - drop
    return lambda theta: acc(theta) >= floor


def compute(
    cfg: Config, request_id: str, ids: list[str], force: bool, plan: dict | None = None
) -> dict:
    """Retrain, stitch, evaluate and stage one deletion (nothing visible changes yet)."""
    start = time.time()
    plan = plan or plan_deletion(ids, cfg.paths.blocks, Forgotten.of(cfg), force)
    _require_local(cfg, request_id)
    store = ParamStore.open(cfg.paths.store)
    store.require_complete()
    trainer = Trainer.from_config(cfg)
    before, _ = store.read(store.n_blocks)
    manifest = read_manifest(cfg.paths.blocks)
    result = sweep(trainer, store, plan, stop_rule(cfg), accuracy_guard(cfg, trainer, plan, before))
    crashpoint("after_retrain")
    n_test_acc = accuracy(trainer, result.served, cfg)
    rows = list(range(result.first, result.stop + 1))
    superseded = [
        file_digest(f, "md5") for f in txn.superseded_files(cfg, store, sorted(plan), rows)
    ]
    record = {
        "request_id": request_id,
        **IdHasher.of(cfg).hashes(ids),  # sample_id_hashes, keyed (see audit.py)
        "blocks": sorted(plan),
        "epsilon": cfg.forget.epsilon,
        "method": cfg.forget.method,
        **{k: v for k, v in result.summary().items() if not k.endswith("_seconds")},
        "timings_s": {
            "retrain": result.train_seconds,
            "sweep": result.total_seconds,
            "compute": time.time() - start,
        },
        "model_before": model_hash(before),
        "model_after": model_hash(result.served),
        "blocks_before": {str(k): manifest["blocks"][k - 1]["sha256"] for k in sorted(plan)},
        "accuracy_after": n_test_acc,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    metrics = {
        "evaluate.json": {
            "accuracy": n_test_acc,
            "n_test": _n_test(cfg),
            "checkpoint": store.n_blocks,
        }
    }
    if _can_verify(cfg, manifest):  # keep metrics/verify.json true to the new served model
        metrics["verify.json"] = verify(cfg, result.served, trainer, also_forgotten=tuple(ids))
    elif (cfg.paths.metrics / "verify.json").is_file():  # never leave an old verdict standing
        stale = "a deletion changed the model; run `obliviate verify`"
        metrics["verify.json"] = {"status": "stale", "passed": False, "sentence": stale}
    return txn.stage(cfg, request_id, result, record, metrics, superseded)


def _require_local(cfg: Config, request_id: str) -> None:
    """Refuse a store on object storage before any work (without opening it), closing the
    journal entry so that recovery does not retry the request forever."""
    try:
        require_local(cfg.paths.store)
    except StoreError as exc:
        txn.finish_request(txn.State.of(cfg), request_id, status="refused", why=str(exc))
        raise


def _can_verify(cfg: Config, manifest: dict) -> bool:
    return (
        cfg.verify.enabled
        and bool(owner_hashes(manifest))
        and cfg.verify.q_source in ("clean", "control")
        and (cfg.paths.metrics / "original.json").is_file()
    )


def _n_test(cfg: Config) -> int:
    with np.load(cfg.paths.test, allow_pickle=False) as z:
        return len(z["y"])


def execute(cfg: Config, entry: dict, plan: dict | None = None) -> dict:
    """Compute and apply a journaled request."""
    compute(cfg, entry["request_id"], entry["ids"], entry["force"], plan)
    return txn.apply(cfg, entry["request_id"])


def forget(cfg: Config, ids: list[str], force: bool = False) -> dict:
    """Forget samples by id: one crash-safe deletion, serialised with every other writer.

    Returns the audit record once the new state is committed; ``report`` draws its plot.
    """
    require_local(cfg.paths.store)  # before anything is journaled
    state = txn.State.of(cfg)
    with state.lock():
        txn.recover(cfg, execute)
        plan = plan_deletion(ids, cfg.paths.blocks, Forgotten.of(cfg), force)  # refuse first
        preflight(cfg)  # a damaged store or block stops it before the journal
        request_id = txn.new_request_id()
        txn.journal_request(state, request_id, ids, force)
        return execute(cfg, {"request_id": request_id, "ids": ids, "force": force}, plan)


def report(cfg: Config, record: dict) -> Path:
    """The deletion's residual-memory plot (reports/<request>.png), drawn from its audit record
    after the commit: it is evidence for people, not part of the deletion."""
    return plot_deltas(
        record, cfg.forget.epsilon, cfg.paths.reports / f"{record['request_id']}.png"
    )
