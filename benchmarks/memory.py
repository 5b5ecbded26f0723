"""Peak memory of a deletion against its floor, for the largest preset model (ResNet-50).

Builds a ResNet-50 store on the bundled digits data (B=60, one epoch per block, no optimizer
state kept, so the store stays a few GB), then, each in a fresh process, measures the peak
resident memory of: the floor (build the trainer, read P_{d-1} and P_B, train one block: what any
deletion needs) and deletions that retrain t = 5 and t = 50 blocks (stop rule pinned with
min_blocks = max_blocks, guard off). Retrained rows stream to staging, so the peak should not grow
with t; holding them in memory would add t * |theta| * 4 bytes.

    python benchmarks/memory.py                  # ~10 min, ~6 GB of disk under benchmarks/results
    python benchmarks/memory.py --store-every 10 # the same on a thinned store (its own table)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import stamp

ROOT = stamp.ROOT
CASE = {
    "prepare": {"dataset": "digits", "blocks": 60},
    "train": {"model": "resnet50", "epochs": 1, "batch_size": 16, "keep_optimizer_state": False},
    "verify": {"owner_block": 0},
    "forget": {"max_accuracy_drop": None},
}

PROBE = """
import json, resource, sys
from obliviate.config import load_config
cfg = load_config(sys.argv[1], forget={"min_blocks": int(sys.argv[3]),
                                       "max_blocks": int(sys.argv[3])})
if sys.argv[2] == "floor":
    from obliviate.partition import load_block
    from obliviate.store import ParamStore
    from obliviate.train import Trainer
    store, trainer = ParamStore.open(cfg.paths.store), Trainer.from_config(cfg)
    theta, opt = store.read(0)
    final = store.read_params(store.n_blocks)
    trainer.train_samples(1, theta, opt, load_block(cfg.paths.blocks, 1))
    t = 0
else:
    from obliviate.deletion import forget
    from obliviate.partition import load_block
    t = forget(cfg, [str(load_block(cfg.paths.blocks, 1).ids[0])], refresh=False)["t"]
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "t": t}))
"""


def probe(params: Path, what: str, blocks: int) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(params), what, str(blocks)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the docs' table")
    parser.add_argument(
        "--store-every",
        type=int,
        default=1,
        metavar="S",
        help="train.store_every of the store (S > 1: the memory-sS table)",
    )
    args = parser.parse_args()
    from obliviate import report
    from obliviate.config import load_config
    from obliviate.store import ParamStore

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in CASE.items():
        raw[section].update(values)
    raw["train"]["store_every"] = args.store_every
    params = args.out / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(params)
    report.build(cfg)
    store = ParamStore.open(cfg.paths.store)
    theta_mib = store.params.shape[1] * 4 / 2**20
    pristine = args.out / "pristine"
    report.snapshot(cfg, pristine)
    rows = [{"what": "floor: trainer, 2 rows, 1 block", **probe(params, "floor", 6)}]
    for blocks in (6, 51):  # t = blocks - 1
        report.restore(cfg, pristine)
        rows.append(
            {"what": f"deletion, {blocks} blocks retrained", **probe(params, "forget", blocks)}
        )
    floor = rows[0]["peak_mib"]
    thinned = (
        f" The store keeps every {args.store_every}th row: {len(store.kept_rows())} of "
        f"{store.n_blocks + 1}, {store.nbytes_stored() / 2**20:,.0f} MiB of "
        f"{store.nbytes_raw() / 2**20:,.0f} MiB raw."
        if args.store_every > 1
        else ""
    )
    table = (
        f"ResNet-50 on digits (10 classes): |theta| = {store.params.shape[1]:,} float32 "
        f"= {theta_mib:.0f} MiB per row.{thinned}\n\n"
        "| process | t | peak RSS | / floor | holding the rows in memory would add |\n"
        "|---|---|---|---|---|\n"
        + "\n".join(
            f"| {r['what']} | {r['t']} | {r['peak_mib']:,.0f} MiB | {r['peak_mib'] / floor:.2f} "
            f"| {(r['t'] + 1) * theta_mib:,.0f} MiB |"
            for r in rows
        )
    )
    name = "memory" if args.store_every == 1 else f"memory-s{args.store_every}"
    (args.out.parent / f"{name}.json").write_text(json.dumps(rows, indent=1))
    print(table)
    shutil.rmtree(args.out, ignore_errors=True)
    if not args.no_docs:
        command = "python " + " ".join(["benchmarks/memory.py", *sys.argv[1:]])
        stamp.write(ROOT / "docs" / "benchmarks.md", name, table, command)


if __name__ == "__main__":
    main()
