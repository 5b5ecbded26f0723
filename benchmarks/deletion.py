"""Deletion benchmark: DeepObliviate against naive retraining, measured in the same run.

For each case and each (number of samples, position) it restores the freshly trained workspace,
forgets the samples end to end (`obliviate.deletion.forget`: validation, retraining with the
stop rule, stitching, evaluation, staging, apply, audit; no Prefect, no DVC; after one untimed
warm-up deletion, as in a long-running worker), then retrains naively from P_0 on the reduced
blocks, and compares.

    python benchmarks/deletion.py                       # both cases, ~15 min
    python benchmarks/deletion.py --case purchase-mlp --sizes 1 --positions first

Columns: speed-up = naive wall / deletion wall; t = blocks retrained after the first affected;
consistency = share of test predictions equal to naive's; do-nothing = the original model
against naive; L1 ratio = ||M' - naive||_1 / ||M_B - naive||_1; non-training share = deletion
wall time spent outside train_block.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from stored_training import CASES, ROOT, case_config

from obliviate.compare import naive_config, predictions
from obliviate.data import load_dataset
from obliviate.deletion import forget
from obliviate.partition import balanced_partition, load_block, write_blocks
from obliviate.store import ParamStore
from obliviate.train import Trainer, stored_training

POSITIONS = ("first", "middle", "last")


def pick(cfg, n: int, position: str) -> list[str]:
    """n sample ids from the block at `position`, spilling into its neighbours when n exceeds
    what a block can give (every block keeps at least one sample of each class it has)."""
    n_blocks = cfg.prepare.blocks
    start = {"first": 1, "middle": n_blocks // 2, "last": n_blocks}[position]
    step = -1 if position == "last" else 1
    ids: list[str] = []
    k = start
    while len(ids) < n:
        block = load_block(cfg.paths.blocks, k)
        keep_one = {int(c): i for i, c in reversed(list(enumerate(block.y)))}  # first per class
        spare = [str(s) for i, s in enumerate(block.ids) if i not in keep_one.values()]
        ids += spare[: n - len(ids)]
        k += step
    return ids


def l1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).sum())


def snapshot(cfg, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    for src in (cfg.paths.blocks, cfg.paths.store):
        shutil.copytree(src, dest / src.name)


def restore(cfg, src: Path) -> None:
    for dst in (cfg.paths.blocks, cfg.paths.store):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src / dst.name, dst)
    for p in (cfg.paths.audit, cfg.paths.state, cfg.paths.reports, cfg.paths.naive_store):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_case(name: str, sizes: list[int], positions: list[str], workdir: Path) -> list[dict]:
    shutil.rmtree(workdir, ignore_errors=True)  # no audit or journal from an earlier run
    cfg = case_config(name, workdir)
    ds = load_dataset(cfg.prepare, cfg.root)
    blocks = balanced_partition(ds.train.y, cfg.prepare.blocks, cfg.prepare.seed)
    write_blocks(ds, blocks, cfg.paths.blocks, cfg.paths.test, {})
    t0 = time.perf_counter()
    original = stored_training(cfg, overwrite=True)
    stored_s = time.perf_counter() - t0
    theta_b = original.read(original.n_blocks)[0]
    pristine = workdir / "pristine"
    snapshot(cfg, pristine)
    trainer = Trainer.from_config(cfg)
    y = np.load(cfg.paths.test)["y"]
    p_orig = predictions(cfg, trainer, theta_b)
    forget(cfg, pick(cfg, 1, "middle"), force=True)  # warm-up: first-use imports (scipy, nolds)
    rows = []
    for n in sizes:
        for position in positions:
            restore(cfg, pristine)
            ids = pick(cfg, n, position)
            t0 = time.perf_counter()
            record = forget(cfg, ids, force=True)
            deletion_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            naive = stored_training(naive_config(cfg), overwrite=True)
            naive_s = time.perf_counter() - t0
            theta_n = naive.read(naive.n_blocks)[0].astype(np.float64)
            theta_u = ParamStore.open(cfg.paths.store).read(original.n_blocks)[0]
            p_naive = predictions(cfg, trainer, theta_n.astype(np.float32))
            p_unl = predictions(cfg, trainer, theta_u)
            row = {
                "case": name,
                "samples": n,
                "position": position,
                "blocks": record["blocks"],
                "t": record["t"],
                "reason": record["reason"],
                "deletion_s": deletion_s,
                "naive_s": naive_s,
                "speedup": naive_s / deletion_s,
                "retrain_s": record["timings_s"]["retrain"],
                "non_training_share": 1 - record["timings_s"]["retrain"] / deletion_s,
                "acc_unlearned": float((p_unl == y).mean()),
                "acc_naive": float((p_naive == y).mean()),
                "acc_original": float((p_orig == y).mean()),
                "consistency": float((p_unl == p_naive).mean()),
                "consistency_do_nothing": float((p_orig == p_naive).mean()),
                "l1_ratio": float(l1(theta_u, theta_n) / l1(theta_b, theta_n)),
                "stored_training_s": stored_s,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def multi_vs_sequential(name: str, n: int, workdir: Path) -> dict:
    """n samples in n different blocks: one request (one sweep) against n single requests."""
    cfg = case_config(name, workdir)
    pristine = workdir / "pristine"
    rng = np.random.default_rng(0)
    blocks = sorted(rng.choice(np.arange(1, cfg.prepare.blocks + 1), n, replace=False).tolist())
    restore(cfg, pristine)
    ids = [str(load_block(cfg.paths.blocks, int(k)).ids[0]) for k in blocks]
    t0 = time.perf_counter()
    one = forget(cfg, ids)
    one_s = time.perf_counter() - t0
    theta_one = ParamStore.open(cfg.paths.store).read(cfg.prepare.blocks)[0]
    restore(cfg, pristine)
    t0 = time.perf_counter()
    retrained = sum(forget(cfg, [i])["retrained_blocks"] for i in ids)
    seq_s = time.perf_counter() - t0
    theta_seq = ParamStore.open(cfg.paths.store).read(cfg.prepare.blocks)[0]
    trainer = Trainer.from_config(cfg)
    y = np.load(cfg.paths.test)["y"]
    acc = {k: float((predictions(cfg, trainer, th) == y).mean())
           for k, th in (("one", theta_one), ("sequential", theta_seq))}  # fmt: skip
    row = {
        "case": name, "samples": n, "blocks": blocks,
        "one_request_s": one_s, "one_request_retrained_blocks": one["retrained_blocks"],
        "sequential_s": seq_s, "sequential_retrained_blocks": retrained,
        "acc_one_request": acc["one"], "acc_sequential": acc["sequential"],
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def multi_markdown(rows: list[dict]) -> str:
    head = (
        "| case | samples (one per block) | one request: s / retrained blocks "
        "| sequential: s / retrained blocks | ratio | acc one | acc sequential |\n"
        "|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['case']} | {r['samples']} | {r['one_request_s']:.1f} / "
        f"{r['one_request_retrained_blocks']} | {r['sequential_s']:.1f} / "
        f"{r['sequential_retrained_blocks']} | {r['sequential_s'] / r['one_request_s']:.1f}x "
        f"| {r['acc_one_request']:.4f} | {r['acc_sequential']:.4f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def markdown(rows: list[dict]) -> str:
    head = (
        "| case | samples | position | t | stop | speed-up | acc M' | acc naive | acc original "
        "| cons(M', naive) | cons(original, naive) | L1 ratio | non-training share |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['case']} | {r['samples']} | {r['position']} | {r['t']} | {r['reason']} "
        f"| {r['speedup']:.1f}x | {r['acc_unlearned']:.4f} | {r['acc_naive']:.4f} "
        f"| {r['acc_original']:.4f} | {r['consistency']:.4f} | {r['consistency_do_nothing']:.4f} "
        f"| {r['l1_ratio']:.3f} | {r['non_training_share']:.0%} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--positions", choices=POSITIONS, nargs="+", default=list(POSITIONS))
    parser.add_argument("--multi", type=int, default=10, help="samples for one-vs-sequential")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    rows, multi = [], []
    for name in args.case or list(CASES):
        workdir = args.out / f"deletion-{name}"
        rows += run_case(name, args.sizes, args.positions, workdir)
        if args.multi:
            multi.append(multi_vs_sequential(name, args.multi, workdir))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deletion.json").write_text(json.dumps({"grid": rows, "multi": multi}, indent=1))
    table = markdown(rows) + ("\n\n" + multi_markdown(multi) if multi else "")
    (args.out / "deletion.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
