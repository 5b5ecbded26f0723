"""Stitching from a pretrained P_0 (`train.init`) against a random P_0, measured in one run.

Fashion-MNIST is split three ways: 20,000 training images pretrain LeNet-5 (obliviate's own
stored training, B=10, exported with `obliviate.export` as safetensors); another 25,000 are the
user's data, an npz source (prepare holds out the test share and the validation split as usual);
nothing is shared. On the user's data both runs use the same blocks, recipe and seeds (params.yaml
defaults with B=100); only P_0 differs: random, or the pretrained network. In each run,
``--repeats`` single-sample deletions at the first and at the middle block, each from the
freshly trained workspace and each against a naive retrain from the same P_0 on the same reduced
blocks, as benchmarks/deletion.py measures them.

    python benchmarks/pretrained.py                  # the table of docs/benchmarks.md, ~15 min
    python benchmarks/pretrained.py --repeats 1 --no-docs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import stamp
from deletion import one_deletion, pp
from stored_training import ROOT, case_config

from obliviate import report
from obliviate.config import Config, load_config
from obliviate.data import load_dataset
from obliviate.deletion import forget
from obliviate.evaluate import accuracy
from obliviate.export import export_model
from obliviate.partition import load_samples
from obliviate.store import ParamStore
from obliviate.train import Trainer

DOC = ROOT / "docs" / "benchmarks.md"


def project(folder: Path, source: Path, blocks: int, init: Path | None) -> Config:
    """A scratch project on the npz ``source``: params.yaml's defaults, no verifying owner."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["prepare"].update(dataset="npz", source=str(source), blocks=blocks)
    raw["train"].update(model="lenet5", init=None if init is None else str(init))
    raw["verify"]["owner_block"] = 0
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(folder / "params.yaml")


def split_fashion(work: Path, n_pretrain: int, n_user: int) -> tuple[Path, Path]:
    """pretrain.npz and user.npz: disjoint slices of Fashion-MNIST's training images."""
    fashion = load_dataset(case_config("fashion-mnist-lenet5", work / "fashion").prepare, ROOT)
    out = []
    parts = (slice(0, n_pretrain), slice(n_pretrain, n_pretrain + n_user))
    for name, part in zip(("pretrain", "user"), parts, strict=True):
        s = fashion.train
        np.savez(work / f"{name}.npz", x=s.x[part], y=s.y[part], ids=s.ids[part].astype(str))
        out.append(work / f"{name}.npz")
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="deletions per position")
    parser.add_argument("--blocks", type=int, default=100, help="B of the user's data")
    parser.add_argument("--pretrain-samples", type=int, default=20_000)
    parser.add_argument("--user-samples", type=int, default=25_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "pretrained")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the docs' table")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pretrain_npz, user_npz = split_fashion(args.out, args.pretrain_samples, args.user_samples)

    source = project(args.out / "pretrain", pretrain_npz, 10, None)
    report.build(source)
    init = args.out / "pretrained.safetensors"
    export_model(source, init, "safetensors")

    rows, originals = [], {}
    for name, p0 in (("random", None), ("pretrained", init)):
        cfg = project(args.out / name / "ws", user_npz, args.blocks, p0)
        report.build(cfg)
        served = ParamStore.open(cfg.paths.store).read_params(cfg.prepare.blocks)
        originals[name] = accuracy(Trainer.from_config(cfg), served, cfg)  # test accuracy
        pristine = args.out / name / "pristine"
        report.snapshot(cfg, pristine)
        y = load_samples(cfg.paths.test).y
        forget(cfg, report.pick(cfg, 1, "middle", skip=50), force=True, refresh=False)  # warm-up
        for position in ("first", "middle"):
            for rep in range(args.repeats):
                row = {**one_deletion(cfg, 1, position, rep, pristine, y), "p0": name}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"rows": rows, "original_accuracy": originals, "commit": stamp.commit()}
    (args.out / "pretrained.json").write_text(json.dumps(result, indent=1))
    table = markdown(rows, originals)
    print(table)
    if not args.no_docs:
        command = "python " + " ".join(["benchmarks/pretrained.py", *sys.argv[1:]])
        stamp.write(DOC, "pretrained", table, command)


def markdown(rows: list[dict], originals: dict[str, float]) -> str:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["p0"], r["position"]), []).append(r)
    lines = [
        f"| {p0} | {rs[0]['case']} | {position} | {len(rs)} | {', '.join(str(r['t']) for r in rs)} "
        f"| **{statistics.median(r['speedup'] for r in rs):.1f}x** "
        f"| {pp([r['acc_unlearned'] - r['acc_naive'] for r in rs])} "
        f"| {statistics.mean(r['acc_naive'] for r in rs):.4f} | {originals[p0]:.4f} "
        f"| {statistics.mean(r['consistency'] for r in rs):.4f} |"
        for (p0, position), rs in cells.items()
    ]
    head = (
        "| P_0 | data | position | deletions | t | retraining speed-up (median) "
        "| acc M' − naive, pp (mean ± sd) | acc naive | acc original | cons(M', naive) |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *lines])


if __name__ == "__main__":
    main()
