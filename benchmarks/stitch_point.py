"""Where to stitch: the accuracy of M' against how many blocks t were retrained, by position.

For each deletion (one sample, from the freshly trained workspace) it retrains from the sample's
block d for ``--horizon`` blocks without any stop rule and, at t = 4, 8, 16, ..., stitches
M'_t = P'_{d+t} + (P_B - P_{d+t}) against the original store. For each M'_t it measures:

- test accuracy against a naive retrain on the same reduced data (the target: ≥ naive - 0.3 pp);
- what the guard sees: validation accuracy paired against the original model;
- the basin check of issue 9: the validation loss along the straight line between P'_{d+t} and
  P_{d+t}, as the barrier (the loss at the midpoint above the mean of the ends). A low barrier
  says the two trajectories lie in one basin, where a later stitch should hold;
- the retraining speed-up a stop at t would give (naive's time / t+1 blocks' training time).

The default deletion (stop rule and guard) is run on the same sample too, so its t sits on the
curve. This answers whether a later stitch point is a cheaper fallback than retraining to the end.

    python benchmarks/stitch_point.py                      # fashion-mnist/lenet5 B=500, ~25 min
    python benchmarks/stitch_point.py --positions first --repeats 1 --horizon 32 --no-docs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import stamp
from stored_training import CASES, ROOT, case_config

from obliviate import report
from obliviate.compare import naive_config
from obliviate.deletion import forget
from obliviate.evaluate import test_predictions
from obliviate.guard import Guard
from obliviate.models import load_flat
from obliviate.partition import load_block, load_samples
from obliviate.requests import SampleIndex
from obliviate.store import ParamStore
from obliviate.sweep import stitch
from obliviate.train import Trainer, stored_training

DOC = ROOT / "docs" / "benchmarks.md"


def val_loss(trainer: Trainer, theta: np.ndarray, val, batch_size: int = 512) -> float:
    """Mean cross-entropy of the model theta on the validation split."""
    model = trainer.model
    load_flat(model, torch.as_tensor(theta))
    model.eval()
    total = 0.0
    with torch.no_grad():
        for s in range(0, len(val), batch_size):
            logits = model(trainer.to_inputs(val.x[s : s + batch_size]))
            y = torch.as_tensor(val.y[s : s + batch_size])
            total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    return total / len(val)


def barrier(trainer, a: np.ndarray, b: np.ndarray, val) -> float:
    """Loss at the midpoint of a and b above the mean of the two ends' losses."""
    mid = ((a.astype(np.float64) + b) / 2).astype(np.float32)
    ends = (val_loss(trainer, a, val) + val_loss(trainer, b, val)) / 2
    return val_loss(trainer, mid, val) - ends


def curve(cfg, pristine: Path, sid: str, horizon: int, y: np.ndarray) -> tuple[list, int]:
    """M'_t for t = 4, 8, 16, ... up to horizon (and the store's end) against the original store
    in ``pristine``; the blocks in cfg are already without ``sid``. Returns (points, block d)."""
    old = ParamStore.open(pristine / cfg.paths.store.name)
    trainer = Trainer.from_config(cfg)
    guard = Guard(cfg, trainer, old)
    index = SampleIndex.of(pristine / cfg.paths.blocks.name)
    d = int(index.block[list(index.ids).index(sid)])  # the block the sample left
    final = old.read_params(old.n_blocks)
    theta, opt = old.read(d - 1)
    checks = {4 * 2**i for i in range(12)} | {old.n_blocks - d}
    points, train_s = [], 0.0
    for k in range(d, min(old.n_blocks, d + horizon) + 1):
        t0 = time.perf_counter()
        theta, opt = trainer.train_samples(k, theta, opt, load_block(cfg.paths.blocks, k))
        train_s += time.perf_counter() - t0
        theta, opt = theta.numpy(), None if opt is None else opt.numpy()
        t = k - d
        if t not in checks:
            continue
        orig_k = old.read_params(k)
        served = stitch(final, theta, orig_k) if k < old.n_blocks else theta
        verdict = guard.judge(served)
        points.append({
            "t": t, "blocks_trained": t + 1, "train_s": train_s,
            "test_acc": float((test_predictions(cfg, trainer, served) == y).mean()),
            "val_difference": verdict.difference, "val_upper_bound": verdict.upper_bound,
            "barrier": barrier(trainer, theta, orig_k, guard.val),
        })  # fmt: skip
    return points, d


def one(cfg, pristine: Path, position: str, rep: int, horizon: int, y) -> dict:
    report.restore(cfg, pristine)
    [sid] = report.pick(cfg, 1, position, skip=rep)
    record = forget(cfg, [sid], force=True, refresh=False)  # the default: stop rule and guard
    trainer = Trainer.from_config(cfg)
    served = ParamStore.open(cfg.paths.store).read_params(cfg.prepare.blocks)
    default_acc = float((test_predictions(cfg, trainer, served) == y).mean())
    t0 = time.perf_counter()
    naive = stored_training(naive_config(cfg), overwrite=True)
    naive_s = time.perf_counter() - t0
    naive_acc = float(
        (test_predictions(cfg, trainer, naive.read_params(naive.n_blocks)) == y).mean()
    )
    # the curve retrains on the reduced blocks against the original store
    points, d = curve(cfg, pristine, sid, horizon, y)
    per_block = points[-1]["train_s"] / points[-1]["blocks_trained"]
    for p in points:
        p["speedup"] = naive_s / (p["blocks_trained"] * per_block)
        p["acc_minus_naive"] = p["test_acc"] - naive_acc
    return {
        "case": f"{cfg.prepare.dataset}/{cfg.train.model} B={cfg.prepare.blocks}",
        "position": position, "rep": rep, "block": d, "default_t": record["t"],
        "default_reason": record["reason"], "default_acc_minus_naive": default_acc - naive_acc,
        "naive_acc": naive_acc, "naive_s": naive_s, "points": points,
    }  # fmt: skip


def markdown(rows: list[dict]) -> str:
    cells: dict[tuple, dict[int, list[dict]]] = {}
    for r in rows:
        for p in r["points"]:
            cells.setdefault((r["case"], r["position"]), {}).setdefault(p["t"], []).append(p)
    lines = []
    for (case, position), by_t in cells.items():
        runs = [r for r in rows if (r["case"], r["position"]) == (case, position)]
        default = ", ".join(f"t={r['default_t']}: {100 * r['default_acc_minus_naive']:+.2f}"
                            for r in runs)  # fmt: skip
        for t, ps in sorted(by_t.items()):
            diffs = [100 * p["acc_minus_naive"] for p in ps]
            lines.append(
                f"| {case} | {position} | {t} | {len(ps)} "
                f"| {statistics.mean(diffs):+.2f} (min {min(diffs):+.2f}) "
                f"| {100 * statistics.mean(p['val_difference'] for p in ps):+.2f} "
                f"| {statistics.mean(p['barrier'] for p in ps):.4f} "
                f"| {statistics.median(p['speedup'] for p in ps):.0f}x | {default} |"
            )
    head = (
        "| data | position | t | deletions | test acc M'_t − naive, pp (mean, min) "
        "| validation: M'_t − original, pp (the guard's view) | loss barrier P'↔P "
        "| speed-up if stopped here | the default stop: t and acc − naive, pp |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="fashion-mnist-lenet5")
    parser.add_argument("--positions", nargs="+", default=["first", "middle"],
                        choices=report.POSITIONS)  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="deletions per position")
    parser.add_argument("--horizon", type=int, default=128, help="blocks retrained at most")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the docs' table")
    args = parser.parse_args()
    workdir = args.out / f"stitch-{args.case}"
    cfg = case_config(args.case, workdir / "ws")
    report.build(cfg)
    pristine = workdir / "pristine"
    report.snapshot(cfg, pristine)
    y = load_samples(cfg.paths.test).y
    rows = []
    for position in args.positions:
        for rep in range(args.repeats):
            rows.append(one(cfg, pristine, position, rep, args.horizon, y))
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "stitch_point.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    print(table)
    if not args.no_docs:
        command = "python " + " ".join(["benchmarks/stitch_point.py", *sys.argv[1:]])
        stamp.write(DOC, "stitch-point", table, command)


if __name__ == "__main__":
    main()
