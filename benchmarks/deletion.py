"""Deletion benchmark: DeepObliviate against naive retraining, measured in the same run.

For each case, number of samples and position it makes ``--repeats`` deletions of different
samples, each from the freshly trained workspace, in one warm process (after one untimed warm-up
deletion, as in a long-running worker): `obliviate.deletion.forget` without the post-commit
metric refresh, with the default stop rule and accuracy guard. After each it retrains naively from
P_0 on the same reduced blocks, and compares on the test set. Where the guard refused a stitch it
also measures the stitch it refused (the same sweep without the guard), which gives the guard's
false-refusal and catch rates. ``--naive-seeds`` retrains naive with other seeds to show how far
two equally good models differ.

    python benchmarks/deletion.py                                  # the tables of the docs
    python benchmarks/deletion.py --case purchase-mlp --sizes 1 --positions first --repeats 2
    python benchmarks/deletion.py --store-every 1 5 10 25          # the thinned-store table

``--store-every`` builds the store once per s (`train.store_every`) and deletes one sample at the
first, middle and last block of each, timing the deletion against one naive retrain per position
in the same run (a naive retrain does not depend on s). It reports the store's bytes against the
s = 1 store's and whether the served model's bytes equal s = 1's for the same deletion.

Definitions (docs/benchmarks.md): retraining speed-up = naive stored-training wall time /
the deletion's compute time (accepted to staged: retraining, guard, staging), the number
`obliviate retrain --naive` prints; in-process speed-up = naive / the whole `forget` call
(recovery, validation, journal, compute, apply, audit; no DVC in this scratch workspace).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import stamp
from stored_training import CASES, ROOT, case_config

from obliviate import report
from obliviate.audit import Forgotten
from obliviate.compare import naive_config
from obliviate.deletion import forget, stop_rule
from obliviate.evaluate import test_predictions
from obliviate.partition import load_block, load_samples
from obliviate.requests import plan_deletion
from obliviate.store import ParamStore
from obliviate.sweep import sweep
from obliviate.train import Trainer, stored_training

DOC = ROOT / "docs" / "benchmarks.md"


def unguarded_accuracy(cfg, ids: list[str], y: np.ndarray) -> float:
    """Test accuracy of the stitch the guard refused: the same sweep with no guard."""
    plan = plan_deletion(ids, cfg.paths.blocks, Forgotten.of(cfg), force=True)
    trainer = Trainer.from_config(cfg)
    store = ParamStore.open(cfg.paths.store)
    free = sweep(trainer, store, {k: v for k, v in plan.items() if k > 0}, stop_rule(cfg))
    return float((test_predictions(cfg, trainer, free.served) == y).mean())


def one_deletion(cfg, n: int, position: str, rep: int, pristine: Path, y) -> dict:
    report.restore(cfg, pristine)
    ids = report.pick(cfg, n, position, skip=rep * n)
    refused_acc = None
    record, wall = report.timed(forget, cfg, ids, force=True, refresh=False)
    trainer = Trainer.from_config(cfg)
    served = ParamStore.open(cfg.paths.store).read_params(cfg.prepare.blocks)
    p_unl = test_predictions(cfg, trainer, served)
    naive, naive_s = report.timed(stored_training, naive_config(cfg), overwrite=True)
    p_naive = test_predictions(cfg, trainer, naive.read_params(naive.n_blocks))
    if record["guard_rejections"]:
        report.restore(cfg, pristine)
        refused_acc = unguarded_accuracy(cfg, ids, y)
    compute_s = record["timings_s"]["compute"]
    return {
        "case": f"{cfg.prepare.dataset}/{cfg.train.model} B={cfg.prepare.blocks}",
        "samples": n, "position": position, "rep": rep, "t": record["t"],
        "stop": record["reason"], "guard_rejections": record["guard_rejections"],
        "compute_s": compute_s, "wall_s": wall, "retrain_s": record["timings_s"]["retrain"],
        "naive_s": naive_s, "speedup": naive_s / compute_s, "speedup_in_process": naive_s / wall,
        "acc_unlearned": float((p_unl == y).mean()), "acc_naive": float((p_naive == y).mean()),
        "acc_refused_stitch": refused_acc, "consistency": float((p_unl == p_naive).mean()),
    }  # fmt: skip


def thinning(name: str, every: list[int], out: Path) -> list[dict]:
    """One deletion per position on a store built with each s; naive once per position."""
    from obliviate.hashing import model_hash

    rows, naive, full = [], {}, {}
    for s in every:
        cfg = case_config(name, out / f"thin-{name}" / f"s{s}" / "ws", train={"store_every": s})
        _, build_s = report.timed(report.build, cfg)
        store = ParamStore.open(cfg.paths.store)
        size = store.nbytes_stored()
        pristine = cfg.root.parent / "pristine"
        report.snapshot(cfg, pristine)
        y = load_samples(cfg.paths.test).y
        if not naive:  # one untimed deletion first: imports and caches, as in a warm worker
            forget(cfg, report.pick(cfg, 1, "middle", skip=1), force=True, refresh=False)
        for position in report.POSITIONS:
            report.restore(cfg, pristine)
            ids = report.pick(cfg, 1, position)
            record, _ = report.timed(forget, cfg, ids, force=True, refresh=False)
            trainer = Trainer.from_config(cfg)
            served = ParamStore.open(cfg.paths.store).read_params(cfg.prepare.blocks)
            acc = float((test_predictions(cfg, trainer, served) == y).mean())
            if position not in naive:
                fresh, naive_s = report.timed(stored_training, naive_config(cfg), overwrite=True)
                p = test_predictions(cfg, trainer, fresh.read_params(fresh.n_blocks))
                naive[position] = {"naive_s": naive_s, "acc_naive": float((p == y).mean())}
            full.setdefault(position, model_hash(served))
            compute_s = record["timings_s"]["compute"]
            rows.append({
                "case": f"{cfg.prepare.dataset}/{cfg.train.model} B={cfg.prepare.blocks}",
                "s": s, "position": position, "build_s": build_s, "store_bytes": size,
                "raw_bytes": store.nbytes_raw(), "kept_rows": len(store.kept_rows()),
                "t": record["t"], "compute_s": compute_s, **naive[position],
                "speedup": naive[position]["naive_s"] / compute_s, "acc": acc,
                "served_sha256": model_hash(served),
                "same_bytes_as_first_s": model_hash(served) == full[position],
                "commit": stamp.commit(), "params_sha256": stamp.params_digest(),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def thinning_markdown(rows: list[dict]) -> str:
    head = ("| case | s | rows kept | store / s=1 store | stored training | position | t | "
            "deletion | naive | speed-up | accuracy (naive) | served bytes = s=1 |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    base = {(r["case"]): r["store_bytes"] for r in rows if r["s"] == 1}
    out = [head]
    for r in rows:
        ratio = f"{r['store_bytes'] / base[r['case']]:.3f}" if r["case"] in base else "n/a"
        same = "yes" if r["same_bytes_as_first_s"] else "NO"
        out.append(
            f"| {r['case']} | {r['s']} | {r['kept_rows']} | {r['store_bytes'] / 2**20:.1f} MiB, "
            f"{ratio} | {r['build_s']:.0f} s | {r['position']} | {r['t']} | "
            f"{r['compute_s']:.2f} s | {r['naive_s']:.1f} s | {r['speedup']:.1f}x | "
            f"{r['acc']:.4f} ({r['acc_naive']:.4f}) | {same} |"
        )
    return "\n".join(out)


def naive_seed_spread(cfg, pristine: Path, seeds: int, y) -> list[float]:
    """Test accuracy of naive retrains on the pristine data with train.seed + 0..seeds."""
    report.restore(cfg, pristine)
    trainer = Trainer.from_config(cfg)
    accs = []
    for s in range(seeds + 1) if seeds else []:
        seeded = naive_config(cfg).model_copy(
            update={"train": cfg.train.model_copy(update={"seed": cfg.train.seed + s})}
        )
        store = stored_training(seeded, overwrite=True)
        accs.append(
            float((test_predictions(cfg, trainer, store.read_params(store.n_blocks)) == y).mean())
        )
    return accs


def pp(values: list[float]) -> str:
    """mean ± sd in percentage points."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):+.2f} ± {100 * sd:.2f}"


def grid_markdown(rows: list[dict], spreads: dict[str, list[float]]) -> str:
    head = (
        "| data | samples | position | deletions | t | guard refusals | retraining speed-up "
        "(median) | in-process speed-up (median) | acc M' − naive, pp (mean ± sd) "
        "| acc naive | naive seed-to-seed sd, pp | cons(M', naive) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = []
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["case"], r["samples"], r["position"]), []).append(r)
    for (case, n, position), rs in cells.items():
        spread = spreads.get(case)
        sd = f"{100 * statistics.stdev(spread):.2f}" if spread and len(spread) > 1 else "-"
        lines.append(
            f"| {case} | {n} | {position} | {len(rs)} | {', '.join(str(r['t']) for r in rs)} "
            f"| {sum(r['guard_rejections'] > 0 for r in rs)} "
            f"| **{statistics.median(r['speedup'] for r in rs):.1f}x** "
            f"| {statistics.median(r['speedup_in_process'] for r in rs):.1f}x "
            f"| {pp([r['acc_unlearned'] - r['acc_naive'] for r in rs])} "
            f"| {statistics.mean(r['acc_naive'] for r in rs):.4f} | {sd} "
            f"| {statistics.mean(r['consistency'] for r in rs):.4f} |"
        )
    return "\n".join([head, *lines])


def guard_markdown(rows: list[dict]) -> str:
    """False refusals: single-sample deletions whose refused stitch was within 0.3 pp of naive.
    Catches: deletions whose unguarded stitch would have lost more than 1 pp, refused."""
    single = [r for r in rows if r["samples"] == 1]
    false = [r for r in single if r["guard_rejections"] and
             r["acc_refused_stitch"] >= r["acc_naive"] - 0.003]  # fmt: skip
    refused = [r for r in rows if r["guard_rejections"]]
    bad = [r for r in refused if r["acc_refused_stitch"] < r["acc_naive"] - 0.01]
    served_bad = [r for r in rows if r["acc_unlearned"] < r["acc_naive"] - 0.01]
    return (
        "| measure | count | rate |\n|---|---|---|\n"
        f"| single-sample deletions refused although the stitch was within 0.3 pp of naive "
        f"(false refusals) | {len(false)} of {len(single)} "
        f"| {len(false) / max(1, len(single)):.0%} |\n"
        f"| refused stitches that would have lost more than 1 pp against naive (catches) "
        f"| {len(bad)} of {len(refused)} refusals | - |\n"
        f"| served models more than 1 pp below naive (misses) | {len(served_bad)} of {len(rows)} "
        f"| {len(served_bad) / max(1, len(rows)):.0%} |"
    )


def multi_vs_sequential(cfg, n: int, pristine: Path, y, close: bool) -> dict:
    """n samples in n different blocks (far apart, or adjacent blocks mid-run): one request
    (planned into sweeps) against n single requests."""
    if close:
        blocks = list(range(cfg.prepare.blocks // 2, cfg.prepare.blocks // 2 + n))
    else:
        blocks = sorted(np.random.default_rng(0).choice(cfg.prepare.blocks, n, replace=False) + 1)
    report.restore(cfg, pristine)
    ids = [str(load_block(cfg.paths.blocks, int(k)).ids[0]) for k in blocks]
    one, one_s = report.timed(forget, cfg, ids, refresh=False)
    theta_one = ParamStore.open(cfg.paths.store).read_params(cfg.prepare.blocks)
    report.restore(cfg, pristine)
    t0 = time.perf_counter()
    retrained = sum(forget(cfg, [i], refresh=False)["retrained_blocks"] for i in ids)
    seq_s = time.perf_counter() - t0
    theta_seq = ParamStore.open(cfg.paths.store).read_params(cfg.prepare.blocks)
    trainer = Trainer.from_config(cfg)
    acc = {k: float((test_predictions(cfg, trainer, th) == y).mean())
           for k, th in (("one", theta_one), ("sequential", theta_seq))}  # fmt: skip
    return {
        "case": f"{cfg.prepare.dataset}/{cfg.train.model}", "samples": n,
        "blocks": [int(b) for b in blocks], "one_request_s": one_s, "sweeps": len(one["sweeps"]),
        "one_request_retrained_blocks": sum(s["retrained_blocks"] for s in one["sweeps"]),
        "sequential_s": seq_s,
        "sequential_retrained_blocks": retrained, "acc_one_request": acc["one"],
        "acc_sequential": acc["sequential"],
    }  # fmt: skip


def multi_markdown(rows: list[dict]) -> str:
    head = (
        "| case | samples, one per block | blocks | one request: sweeps / s / retrained blocks "
        "| one by one: s / retrained blocks | one request / one by one (time) "
        "| acc one request | acc one by one |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['case']} | {r['samples']} | {', '.join(map(str, r['blocks']))} | {r['sweeps']} / "
        f"{r['one_request_s']:.1f} / {r['one_request_retrained_blocks']} "
        f"| {r['sequential_s']:.1f} / {r['sequential_retrained_blocks']} "
        f"| {r['one_request_s'] / r['sequential_s']:.0%} "
        f"| {r['acc_one_request']:.4f} "
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
    parser.add_argument("--repeats", type=int, default=5, help="deletions per single-sample cell")
    parser.add_argument("--repeats-large", type=int, default=3,
                        help="deletions per cell of more than one sample")  # fmt: skip
    parser.add_argument("--naive-seeds", type=int, default=2, help="extra naive seeds")
    parser.add_argument("--multi", type=int, default=10, help="samples for one-vs-sequential")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the docs' tables")
    parser.add_argument(
        "--store-every",
        type=int,
        nargs="+",
        metavar="S",
        help="the thinned-store table: one store per s (first: the reference)",
    )
    parser.add_argument("--tables-from", type=Path, nargs="+", metavar="FILE",
                        help="measure nothing: write the tables from the rows of earlier runs "
                        "(their deletion.json, or the JSON lines they printed)")  # fmt: skip
    parser.add_argument("--measured-by", help="with --tables-from: the commands that measured")
    args = parser.parse_args()
    if args.store_every:
        rows = [r for name in args.case or list(CASES)
                for r in thinning(name, args.store_every, args.out)]  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "store_every.json").write_text(json.dumps(rows, indent=1))
        command = "python " + " ".join(["benchmarks/deletion.py", *sys.argv[1:]])
        if not args.no_docs:
            stamp.write(DOC, "store-every", thinning_markdown(rows), command, rows[0])
        return
    if args.tables_from:
        return write_tables(*rows_from(args.tables_from), args.measured_by, args.no_docs)
    rows, multi, spreads = [], [], {}
    for name in args.case or list(CASES):
        workdir = args.out / f"deletion-{name}"
        cfg = case_config(name, workdir / "ws")
        report.build(cfg)
        pristine = workdir / "pristine"
        report.snapshot(cfg, pristine)
        y = load_samples(cfg.paths.test).y
        forget(cfg, report.pick(cfg, 1, "middle"), force=True, refresh=False)  # warm-up
        for n in args.sizes:
            for position in args.positions:
                for rep in range(args.repeats if n == 1 else args.repeats_large):
                    rows.append(one_deletion(cfg, n, position, rep, pristine, y))
                    print(json.dumps(rows[-1]), flush=True)
        spreads[rows[-1]["case"]] = naive_seed_spread(cfg, pristine, args.naive_seeds, y)
        if args.multi:
            for close in (False, True):
                multi.append(multi_vs_sequential(cfg, args.multi, pristine, y, close))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"grid": rows, "naive_seed_accuracies": spreads, "multi": multi}
    (args.out / "deletion.json").write_text(json.dumps(result, indent=1))
    command = "python " + " ".join(["benchmarks/deletion.py", *sys.argv[1:]])
    write_tables(rows, spreads, multi, command, args.no_docs)


def rows_from(files: list[Path]) -> tuple[list, dict, list]:
    """Grid rows, naive seed accuracies and planner rows from earlier runs' outputs."""
    rows, spreads, multi = [], {}, []
    for f in files:
        text = f.read_text()
        if f.suffix == ".json":
            result = json.loads(text)
            rows += result["grid"]
            spreads |= result["naive_seed_accuracies"]
            multi += result["multi"]
        else:  # a log: the rows the run printed as it went
            rows += [json.loads(line) for line in text.splitlines()
                     if line.startswith("{") and '"rep"' in line]  # fmt: skip
    return rows, spreads, multi


def write_tables(rows, spreads, multi, command: str, no_docs: bool) -> None:
    tables = {"deletion-grid": grid_markdown(rows, spreads), "deletion-guard": guard_markdown(rows)}
    if multi:
        tables["deletion-multi"] = multi_markdown(multi)
    for key, table in tables.items():
        print(table, "\n")
        if not no_docs:
            stamp.write(DOC, key, table, command)


if __name__ == "__main__":
    main()
