"""SISA against obliviate and naive retraining (a table like the paper's Table VII).

Same data, model, recipe and per-sample epoch budget; SISA's S shards x R slices reuse
obliviate's B = S*R balanced blocks. For one deletion (a sample of the middle block) it measures:
accuracy after the deletion, the retraining speed-up over naive (measured wall time, not
computed), the prediction cost on the test set, and the checkpoint storage.

    python benchmarks/sisa.py                       # both cases, S in 5 and 10, ~10 min
    python benchmarks/sisa.py --case purchase-mlp --shards 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from deletion import pick, restore, snapshot
from stored_training import CASES, ROOT, case_config

from obliviate.compare import naive_config, predictions
from obliviate.data import load_dataset
from obliviate.deletion import forget
from obliviate.partition import balanced_partition, load_samples, write_blocks
from obliviate.requests import plan_deletion
from obliviate.sisa import forget_sisa, train_sisa, vote
from obliviate.store import ParamStore
from obliviate.train import Trainer, stored_training


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def run_case(name: str, shard_counts: list[int], workdir: Path) -> list[dict]:
    shutil.rmtree(workdir, ignore_errors=True)
    cfg = case_config(name, workdir)
    ds = load_dataset(cfg.prepare, cfg.root)
    blocks = balanced_partition(ds.train.y, cfg.prepare.blocks, cfg.prepare.seed)
    write_blocks(ds, blocks, cfg.paths.blocks, cfg.paths.test, {})
    store, train_s = timed(stored_training, cfg)
    snapshot(cfg, workdir / "pristine")
    test = load_samples(cfg.paths.test)
    trainer = Trainer.from_config(cfg)
    ids = pick(cfg, 1, "middle")
    plan = plan_deletion(ids, cfg.paths.blocks, cfg.paths.audit)

    forget(cfg, pick(cfg, 1, "first"), force=True)  # warm-up imports, then start clean
    restore(cfg, workdir / "pristine")
    _, obl_s = timed(forget, cfg, ids)
    obl_theta = ParamStore.open(cfg.paths.store).read(cfg.prepare.blocks)[0]
    obl_pred, obl_pred_s = timed(predictions, cfg, trainer, obl_theta)
    naive, naive_s = timed(stored_training, naive_config(cfg), True)
    naive_pred = predictions(cfg, trainer, naive.read(naive.n_blocks)[0])
    rows = [
        {"case": name, "method": "naive", "B": cfg.prepare.blocks, "accuracy":
         float((naive_pred == test.y).mean()), "retrain_s": naive_s, "speedup": 1.0,
         "predict_s": obl_pred_s, "storage_bytes": 0},
        {"case": name, "method": "obliviate", "B": cfg.prepare.blocks, "accuracy":
         float((obl_pred == test.y).mean()), "retrain_s": obl_s, "speedup": naive_s / obl_s,
         "predict_s": obl_pred_s, "storage_bytes": store.nbytes_raw()},
    ]  # fmt: skip
    restore(cfg, workdir / "pristine")
    for shards in shard_counts:
        sisa, sisa_train_s = timed(train_sisa, trainer, shards)
        sisa_s = forget_sisa(trainer, sisa, plan)
        n_classes = trainer.info.n_classes
        pred, pred_s = timed(vote, trainer, sisa, test.x, n_classes, cfg.evaluate.batch_size)
        rows.append({
            "case": name, "method": f"SISA S={shards} R={sisa.slices}", "B": cfg.prepare.blocks,
            "accuracy": float((pred == test.y).mean()), "retrain_s": sisa_s,
            "speedup": naive_s / sisa_s, "predict_s": pred_s,
            "storage_bytes": sisa.storage_bytes(), "train_s": sisa_train_s,
        })  # fmt: skip
    for r in rows:
        r["train_s"] = r.get("train_s", train_s)
        print(json.dumps(r), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| case | method | accuracy | retrain s | retrain speed-up | predict s (test set) "
        "| prediction cost | checkpoint storage (raw) |\n|---|---|---|---|---|---|---|---|"
    )
    base = {r["case"]: r["predict_s"] for r in rows if r["method"] == "obliviate"}
    lines = [
        f"| {r['case']} | {r['method']} | {r['accuracy']:.4f} | {r['retrain_s']:.2f} "
        f"| {r['speedup']:.1f}x | {r['predict_s']:.2f} | {r['predict_s'] / base[r['case']]:.1f}x "
        f"| {r['storage_bytes'] / 2**20:.1f} MiB |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--shards", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    rows = []
    for name in args.case or list(CASES):
        rows += run_case(name, args.shards, args.out / f"sisa-{name}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sisa.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (args.out / "sisa.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
