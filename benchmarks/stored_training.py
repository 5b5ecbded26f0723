"""Stored-training overhead: the blockwise loop with and without writing P_k to the Zarr store.

Both variants run in the same process on the same blocks, alternating, `--repeats` times each;
the ratio of medians is the overhead of storing (target <= 1.03). Also reports the store size
against raw (B+1)*|theta|*4 bytes, and training throughput.

    python benchmarks/stored_training.py                      # both cases of docs/benchmarks.md
    python benchmarks/stored_training.py --case purchase-mlp --repeats 3

Needs Fashion-MNIST in /usr/share/datasets/fashion-mnist (Debian: dataset-fashion-mnist) and the
Purchase CSV (default: ../shared/data/purchase/online_shoppers_intention.csv); a missing source
skips its case.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import stamp

from obliviate.config import Config, load_config
from obliviate.data import load_dataset
from obliviate.errors import DataError
from obliviate.partition import partition_dataset
from obliviate.train import Trainer, stored_training

ROOT = Path(__file__).resolve().parents[1]
PURCHASE_CSV = ROOT.parent / "shared" / "data" / "purchase" / "online_shoppers_intention.csv"

CASES = {
    "fashion-mnist-lenet5": {
        "prepare": {"dataset": "fashion-mnist", "blocks": 500},
        "train": {"model": "lenet5"},
    },
    "purchase-mlp": {
        "prepare": {
            "dataset": "purchase",
            "blocks": 200,
            "source": str(PURCHASE_CSV),
            "test_fraction": 0.1,
        },
        "train": {"model": "mlp"},
    },
}


def case_config(name: str, workdir: Path, **overrides: dict) -> Config:
    """The project's params.yaml with the case's overrides (then ``overrides``, by section) and
    every path under workdir."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for changes in (CASES[name], overrides):
        for section, values in changes.items():
            raw[section].update(values)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(workdir / "params.yaml")


def blockwise_without_store(cfg: Config) -> None:
    trainer = Trainer.from_config(cfg)
    theta, opt = trainer.initial_state()
    for k in range(1, trainer.n_blocks + 1):
        theta, opt = trainer.run_block(k, theta, opt)


def with_store(cfg: Config) -> None:
    stored_training(cfg, overwrite=True)


def timed(fn, cfg) -> float:
    start = time.perf_counter()
    fn(cfg)
    return time.perf_counter() - start


def run_case(name: str, repeats: int, workdir: Path) -> dict | None:
    cfg = case_config(name, workdir)
    try:
        ds = load_dataset(cfg.prepare, cfg.root)
    except DataError as exc:
        print(f"skipping {name}: {exc}")
        return None
    partition_dataset(ds, cfg.prepare, cfg.paths.blocks, cfg.paths.test)
    plain, stored = [], []
    blockwise_without_store(cfg), with_store(cfg)  # warm-up: imports, allocator, page cache
    for i in range(repeats):  # alternate the order to spread drift evenly
        pair = [(plain, blockwise_without_store), (stored, with_store)]
        for bucket, fn in pair if i % 2 == 0 else pair[::-1]:
            bucket.append(timed(fn, cfg))
    store = stored_training(cfg)  # the last stored run, complete
    n_params = int(store.params.shape[1])
    raw_params = (store.n_blocks + 1) * n_params * 4
    params_bytes = sum(
        f.stat().st_size for f in (cfg.paths.store / "params").rglob("*") if f.is_file()
    )
    samples = len(ds.train) * cfg.train.epochs
    result = {
        "case": name,
        "B": store.n_blocks,
        "parameters": n_params,
        "train_samples": len(ds.train),
        "epochs_per_block": cfg.train.epochs,
        "plain_s": statistics.median(plain),
        "stored_s": statistics.median(stored),
        "plain_runs_s": plain,
        "stored_runs_s": stored,
        "overhead_ratio": statistics.median(stored) / statistics.median(plain),
        "params_bytes": params_bytes,
        "params_raw_bytes": raw_params,
        "params_size_ratio": params_bytes / raw_params,
        "store_bytes": store.nbytes_stored(),
        "store_raw_bytes": store.nbytes_raw(),
        "store_size_ratio": store.nbytes_stored() / store.nbytes_raw(),
        "samples_per_s_stored": samples / statistics.median(stored),
        "samples_per_s_plain": samples / statistics.median(plain),
    }
    print(json.dumps(result, indent=1))
    return result


def markdown(results: list[dict]) -> str:
    head = (
        "| case | B | |theta| | plain s | stored s | ratio | P store / raw | with optimizer "
        "state / raw | samples/s |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {r['case']} | {r['B']} | {r['parameters']:,} "
        f"| {r['plain_s']:.1f} | {r['stored_s']:.1f} "
        f"| {r['overhead_ratio']:.3f} | {r['params_bytes'] / 2**20:.1f} MiB / "
        f"{r['params_raw_bytes'] / 2**20:.1f} MiB = {r['params_size_ratio']:.3f} "
        f"| {r['store_bytes'] / 2**20:.1f} MiB / {r['store_raw_bytes'] / 2**20:.1f} MiB "
        f"| {r['samples_per_s_stored']:,.0f} |"
        for r in results
    ]
    return "\n".join([head, *rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the docs' table")
    args = parser.parse_args()
    results = []
    for name in args.case or list(CASES):
        r = run_case(name, args.repeats, args.out / name)
        if r:
            results.append(r)
            shutil.rmtree(args.out / name / "models", ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stored_training.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / "stored_training.md").write_text(table + "\n")
    print(table)
    if not args.no_docs:
        command = "python " + " ".join(["benchmarks/stored_training.py", *sys.argv[1:]])
        stamp.write(ROOT / "docs" / "benchmarks.md", "stored-training", table, command)


if __name__ == "__main__":
    main()
