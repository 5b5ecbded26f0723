"""Deletion benchmark: DeepObliviate against naive retraining, measured in the same run.

For each case and each (number of samples, position) it restores the freshly trained workspace,
forgets the samples end to end (`obliviate.deletion.forget`: validation, retraining with the
stop rule, stitching, evaluation, staging, apply, audit; no Prefect, no DVC; after one untimed
warm-up deletion, as in a long-running worker), then retrains naively from P_0 on the reduced
blocks, and compares (`obliviate.report.grid`). Then it compares one request for samples in
several blocks (one sweep) with the same deletions made one by one.

    python benchmarks/deletion.py                       # both cases, ~25 min
    python benchmarks/deletion.py --case purchase-mlp --sizes 1 --positions first

Columns: speed-up = naive wall / deletion wall; t = blocks retrained after the first affected;
consistency = share of test predictions equal to naive's; do-nothing = the original model
against naive; L1 ratio = ||M' - naive||_1 / ||M_B - naive||_1; non-training share = deletion
wall time spent outside train_block.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from stored_training import CASES, ROOT, case_config

from obliviate import report
from obliviate.compare import predictions
from obliviate.deletion import forget
from obliviate.partition import load_block, load_samples
from obliviate.store import ParamStore
from obliviate.train import Trainer


def multi_vs_sequential(cfg, n: int, pristine: Path) -> dict:
    """n samples in n different blocks: one request (one sweep) against n single requests."""
    blocks = sorted(np.random.default_rng(0).choice(cfg.prepare.blocks, n, replace=False) + 1)
    report.restore(cfg, pristine)
    ids = [str(load_block(cfg.paths.blocks, int(k)).ids[0]) for k in blocks]
    t0 = time.perf_counter()
    one = forget(cfg, ids)
    one_s = time.perf_counter() - t0
    theta_one = ParamStore.open(cfg.paths.store).read(cfg.prepare.blocks)[0]
    report.restore(cfg, pristine)
    t0 = time.perf_counter()
    retrained = sum(forget(cfg, [i])["retrained_blocks"] for i in ids)
    seq_s = time.perf_counter() - t0
    theta_seq = ParamStore.open(cfg.paths.store).read(cfg.prepare.blocks)[0]
    trainer = Trainer.from_config(cfg)
    y = load_samples(cfg.paths.test).y
    acc = {k: float((predictions(cfg, trainer, th) == y).mean())
           for k, th in (("one", theta_one), ("sequential", theta_seq))}  # fmt: skip
    row = {
        "case": f"{cfg.prepare.dataset}/{cfg.train.model}", "samples": n,
        "blocks": [int(b) for b in blocks], "one_request_s": one_s,
        "one_request_retrained_blocks": one["retrained_blocks"], "sequential_s": seq_s,
        "sequential_retrained_blocks": retrained, "acc_one_request": acc["one"],
        "acc_sequential": acc["sequential"],
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def multi_markdown(rows: list[dict]) -> str:
    head = (
        "| case | samples (one per block) | one request: s / retrained blocks "
        "| one by one: s / retrained blocks | acc one request | acc one by one |\n"
        "|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['case']} | {r['samples']} | {r['one_request_s']:.1f} / "
        f"{r['one_request_retrained_blocks']} | {r['sequential_s']:.1f} / "
        f"{r['sequential_retrained_blocks']} | {r['acc_one_request']:.4f} "
        f"| {r['acc_sequential']:.4f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--positions", choices=report.POSITIONS, nargs="+",
                        default=list(report.POSITIONS))  # fmt: skip
    parser.add_argument("--multi", type=int, default=10, help="samples for one-vs-sequential")
    parser.add_argument("--method", choices=["dfa", "fit"], help="override forget.method")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    rows, multi = [], []
    for name in args.case or list(CASES):
        workdir = args.out / f"deletion-{name}"
        cfg = case_config(name, workdir / "ws")
        if args.method:
            cfg = cfg.model_copy(
                update={"forget": cfg.forget.model_copy(update={"method": args.method})}
            )
        report.build(cfg)
        report.snapshot(cfg, workdir / "pristine")
        rows += report.grid(cfg, [cfg.forget.epsilon], args.sizes, args.positions,
                            workdir / "pristine")  # fmt: skip
        print(report.grid_markdown(rows), flush=True)
        if args.multi:
            multi.append(multi_vs_sequential(cfg, args.multi, workdir / "pristine"))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "deletion" + (f"-{args.method}" if args.method else "")
    (args.out / f"{stem}.json").write_text(json.dumps({"grid": rows, "multi": multi}, indent=1))
    table = report.grid_markdown(rows) + ("\n\n" + multi_markdown(multi) if multi else "")
    (args.out / f"{stem}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
