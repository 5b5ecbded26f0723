"""A request stream through the served path: N single-sample deletion requests at random
positions, each queued and drained by one long-running process (the drain flow, as the
scheduled deployment runs it), in a real DVC + git workspace.

    python benchmarks/stream.py                          # fashion-mnist/lenet5 B=500, 100 requests
    python benchmarks/stream.py --requests 20            # the lifecycle table: commit vs done
    python benchmarks/stream.py --requests 20 --case purchase-mlp

Reports per-request latency, p50 and p95, to two points: the deletion committed (the store,
blocks and audit changed, versioned with DVC and git, the superseded cache objects purged: the
sample is gone) and the request marked done in the journal (a request is done at its commit;
the test metric and the verdict of the new model are refreshed after it, and timed apart);
where that time goes, phase by phase; the served speed-up
by the position of the sample's block (first tenth, middle fifth, last tenth); the total wall time
against one naive retrain in the same run; and after the stream: the served model's accuracy and
its consistency with a naive retrain on the final data, and how the validation accuracy (what
the guard judges, against the original) drifted.

    python benchmarks/stream.py --max-accuracy-drop 0.005   # another guard bound: the curve only
    python benchmarks/stream.py --curve-from benchmarks/results/stream.json \
        benchmarks/results/stream-drop0.005.json             # the trade-off table of both

The main tables are measured with 100 requests at params.yaml's guard bound and seed 0, the
lifecycle table (latency to commit against latency to done) with ``--requests 20``; a run with
another bound, ``--seed`` (other samples requested) or another ``--requests`` writes only its
JSON (stream-drop<bound>-seed<N>-n<requests>.json), for ``--curve-from`` and the guard's
trade-off table (`make bench` runs the curve in benchmarks/results/curve50).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import stamp
from stored_training import CASES, ROOT, case_config

DOC = ROOT / "docs" / "benchmarks.md"
REQUESTS = 100  # the main tables' stream length
LIFECYCLE_REQUESTS = 20  # the lifecycle table's


def workspace(name: str, folder: Path, max_drop: float | None):
    """A DVC + git workspace of the case, trained with `dvc repro` (no verifying owner)."""
    shutil.rmtree(folder, ignore_errors=True)
    cfg = case_config(name, folder)
    raw = yaml.safe_load((folder / "params.yaml").read_text())
    raw["verify"]["owner_block"] = 0
    if max_drop is not None:
        raw["forget"]["max_accuracy_drop"] = max_drop
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", folder / "dvc.yaml")
    shutil.copytree(ROOT / "obliviate", folder / "obliviate")  # dvc.yaml's code deps
    (folder / "audit").mkdir()
    (folder / "audit" / "deletions.jsonl").touch()  # the prepare stage reads the audit trail
    (folder / ".gitignore").write_text("/data/\n/models/\n/metrics/\n/reports/\n/.obliviate/\n"
                                       "/.prefect/\n")  # fmt: skip
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PREFECT_HOME": str(folder / ".prefect")}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "-q", "evaluate"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "stream workspace"]):  # fmt: skip
        exe = Path(sys.executable).parent / cmd[0]
        subprocess.run([str(exe) if exe.is_file() else cmd[0], *cmd[1:]], cwd=folder, env=env,
                       check=True)  # fmt: skip
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="fashion-mnist-lenet5")
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--seed", type=int, default=0,
                        help="which samples to request (another: its JSON only)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--max-accuracy-drop", type=float,
                        help="the guard's bound (default: params.yaml's); another value writes "
                        "only its JSON, for --curve-from")  # fmt: skip
    parser.add_argument("--curve-from", type=Path, nargs="+", metavar="JSON",
                        help="measure nothing: write the guard trade-off table from the JSON "
                        "of earlier runs")  # fmt: skip
    parser.add_argument("--tables-from", type=Path, metavar="JSON",
                        help="measure nothing: write the stream tables from an earlier run's "
                        "JSON (stamped with the command and commit that measured it)")  # fmt: skip
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the docs' table")
    parser.add_argument("--exact", action="store_true",
                        help="the stream with consolidation: refusal policies, triggers and "
                        "intervals, each ending exact (benchmarks/exact_stream.py)")  # fmt: skip
    parser.add_argument("--only", nargs="+", metavar="VARIANT",
                        help="with --exact: run only these variants")  # fmt: skip
    parser.add_argument("--exact-from", type=Path, metavar="JSON",
                        help="measure nothing: write the --exact tables from an earlier run's "
                        "JSON (stamped with the command and commit that measured it)")  # fmt: skip
    args = parser.parse_args()
    if args.exact_from:
        import exact_stream

        return exact_stream.write(json.loads(args.exact_from.read_text()), args.no_docs)
    if args.curve_from:
        return write_curve(args.curve_from, args.no_docs)
    if args.tables_from:
        return write_tables(json.loads(args.tables_from.read_text()), args.no_docs)
    default = yaml.safe_load((ROOT / "params.yaml").read_text())["forget"]["max_accuracy_drop"]
    bound = args.max_accuracy_drop in (None, default)
    main_run = bound and args.seed == 0 and args.requests == REQUESTS  # the docs' main tables
    lifecycle_run = bound and args.seed == 0 and args.requests == LIFECYCLE_REQUESTS
    suffix = "" if bound else f"-drop{args.max_accuracy_drop:g}"
    suffix += (f"-seed{args.seed}" if args.seed else "") + (
        f"-n{args.requests}" if args.requests != REQUESTS else "")  # fmt: skip
    suffix += "-exact" if args.exact else ""
    args.out = args.out.resolve()  # PREFECT_HOME and DVC's paths need it absolute
    folder = args.out / f"stream-{args.case}{suffix}"
    case_cfg = workspace(args.case, folder, args.max_accuracy_drop)

    from obliviate.runtime import configure_prefect, quiet_console

    configure_prefect(folder)
    import flows.deletion

    quiet_console()
    from obliviate import lifecycle
    from obliviate.audit import read_records
    from obliviate.compare import naive_config
    from obliviate.config import load_config
    from obliviate.evaluate import test_predictions
    from obliviate.partition import load_samples
    from obliviate.requests import SampleIndex
    from obliviate.store import ParamStore
    from obliviate.train import Trainer, stored_training

    params = folder / "params.yaml"
    cfg = load_config(params)
    assert cfg.paths.store == case_cfg.paths.store
    index = SampleIndex.of(cfg.paths.blocks)
    trained = np.flatnonzero(index.block > 0)
    rng = np.random.default_rng(args.seed)
    picks = [str(index.ids[i]) for i in rng.choice(trained, args.requests, replace=False)]
    if args.exact:
        import exact_stream

        t0 = time.perf_counter()
        stored_training(naive_config(cfg), overwrite=True)  # the exact store retrained: naive
        return exact_stream.main(args, folder, cfg, picks, time.perf_counter() - t0)
    test = load_samples(cfg.paths.test)
    trainer = Trainer.from_config(cfg)
    original = ParamStore.open(cfg.paths.store).read_params(cfg.prepare.blocks)
    p_original = test_predictions(cfg, trainer, original)
    requests = []
    flows.deletion.drain_flow(str(params))  # warm-up: Prefect's server, imports (nothing queued)
    start = time.perf_counter()
    for sid in picks:
        t0 = time.time()
        request = lifecycle.submit(cfg, [sid])
        s = time.perf_counter()
        r = flows.deletion.drain_flow(str(params))
        flow_s = time.perf_counter() - s
        done = lifecycle.get(cfg, request)
        assert done["status"] == "done", done
        requests.append(phases(r, t0, done["finished_unix"], flow_s))
    stream_s = time.perf_counter() - start
    latencies = [q["to done"] for q in requests]
    t0 = time.perf_counter()
    naive = stored_training(naive_config(cfg), overwrite=True)
    naive_s = time.perf_counter() - t0
    served = ParamStore.open(cfg.paths.store).read_params(cfg.prepare.blocks)
    p_served = test_predictions(cfg, trainer, served)
    p_naive = test_predictions(cfg, trainer, naive.read_params(naive.n_blocks))
    records = read_records(cfg.paths.audit)
    val = [r["val_accuracy_after"] for r in records if r["val_accuracy_after"] is not None]
    ref = next(r["guard"]["reference_accuracy"] for r in records if r["guard"])
    row = {
        "case": f"{cfg.prepare.dataset}/{cfg.train.model} B={cfg.prepare.blocks}",
        "blocks": cfg.prepare.blocks,
        "requests": args.requests, "seed": args.seed,
        "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)), "naive_s": naive_s,
        "stream_s": stream_s,
        "commit_p50_s": float(np.percentile([q["to commit"] for q in requests], 50)),
        "commit_p95_s": float(np.percentile([q["to commit"] for q in requests], 95)),
        "non_training_share_p50": float(np.median([1 - q["retraining"] / q["to done"]
                                                   for q in requests])),
        "non_training_share_commit_p50": float(np.median([1 - q["retraining"] / q["to commit"]
                                                          for q in requests])),
        "max_accuracy_drop": cfg.forget.max_accuracy_drop, "commit": stamp.commit(),
        "params_sha256": stamp.params_digest(),
        "acc_original": float((p_original == test.y).mean()),
        "acc_served": float((p_served == test.y).mean()),
        "acc_naive": float((p_naive == test.y).mean()),
        "consistency": float((p_served == p_naive).mean()), "val_reference": ref,
        "val_first": val[0], "val_last": val[-1], "val_min": min(val),
        "t_values": [r["t"] for r in records],
        "guard_refusals": sum(r["guard_rejections"] > 0 for r in records),
    }  # fmt: skip
    command = "python " + " ".join(["benchmarks/stream.py", *sys.argv[1:]])
    result = {**row, "command": command, "requests_s": requests}
    (args.out / f"stream{suffix}.json").write_text(json.dumps(result, indent=1))
    if lifecycle_run:
        write_lifecycle(result, args.no_docs)
    write_tables(result, no_docs=args.no_docs or not main_run)


def one_in(ratio: float) -> str:
    """1/N for a fraction, N with a decimal while it is small (1/1.5, 1/24)."""
    return f"1/{ratio:.1f}" if ratio < 10 else f"1/{ratio:.0f}"


def write_tables(r: dict, no_docs: bool) -> None:
    """The stream and phase tables of one run's JSON, stamped with the command and the commit
    that measured it."""
    table = (
        "| data | requests | latency to commit p50 / p95 | latency to done p50 / p95 "
        "| naive retrain | p95 (done) / naive | stream total / naive "
        "| non-training share p50 (commit / done) | acc original / served / naive "
        "| cons(served, naive) "
        "| validation acc: original → first → last (min) | deletions the guard extended |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {r['case']} | {r['requests']} "
        f"| {r['commit_p50_s']:.2f} s / {r['commit_p95_s']:.2f} s "
        f"| {r['p50_s']:.2f} s / {r['p95_s']:.2f} s "
        f"| {r['naive_s']:.1f} s | **{one_in(r['naive_s'] / r['p95_s'])}** "
        f"| {r['stream_s'] / r['naive_s']:.2f} "
        f"| {r['non_training_share_commit_p50']:.0%} / {r['non_training_share_p50']:.0%} "
        f"| {r['acc_original']:.4f} / {r['acc_served']:.4f} / {r['acc_naive']:.4f} "
        f"| {r['consistency']:.4f} | {r['val_reference']:.4f} → {r['val_first']:.4f} → "
        f"{r['val_last']:.4f} ({r['val_min']:.4f}) | {r['guard_refusals']} |"
    )
    tables = {"stream": table, "stream-phases": phases_markdown(r["case"], r["requests_s"])}
    if "blocks" in r:  # runs before the position table have no block per request
        tables["stream-positions"] = positions_markdown(r)
    for key, body in tables.items():
        print(body, "\n")
        if not no_docs:
            stamp.write(DOC, key, body, r["command"], r)  # what measured it


PHASES = {  # phase: what it covers
    "queue and Prefect": "submit, the flow run and its task, up to the drain",
    "checks": "recovery, claim, integrity preflight, store and model checks, journal",
    "retraining": "train_block over the retrained blocks",
    "guard and staging": "Delta and the stop rule, the guard's evaluation, staging the rows",
    "apply": "store rows, blocks, audit record, cache purge; the request marked done",
    "versioning": "DVC commit (in-process) and git commit",
    "metric refresh": "after done: test accuracy and verdict of the new model, versioned",
}


def phases(r, t0: float, done_unix: float, flow_s: float) -> dict:
    """One request's latencies and its time by phase (seconds), from the flow's result (a
    ``deletion.Drained``)."""
    sweeps, sec = r.record["sweeps"], r.seconds
    retrain = sum(w["timings_s"]["retrain"] for w in sweeps)
    compute = sum(w["timings_s"]["compute"] for w in sweeps)
    versioning = sum(w["timings_s"]["versioning"] for w in sweeps)
    to_done = done_unix - t0
    inside = sec["checks"] + sec["deletion"]  # the refresh comes after done
    return {
        "to commit": r.committed_unix - t0, "to done": to_done, "flow": flow_s,
        "t": r.record["t"], "block": min(r.record["blocks"]),
        "queue and Prefect": to_done - inside, "checks": sec["checks"],
        "retraining": retrain, "guard and staging": compute - retrain,
        "apply": sec["deletion"] - compute - versioning, "versioning": versioning,
        "metric refresh": sec.get("refresh", 0.0),
    }  # fmt: skip


def write_lifecycle(r: dict, no_docs: bool) -> None:
    """Latency to the commit against latency to done (a request is done at its commit; the
    metric refresh follows apart), per request, at the median and the worst."""
    qs = r["requests_s"]
    gap = [q["to done"] - q["to commit"] for q in qs]
    commit = [q["to commit"] for q in qs]
    done = [q["to done"] for q in qs]
    refresh = [q["metric refresh"] for q in qs]
    table = (
        "| data | requests | latency to commit p50 / p95 | latency to done p50 / p95 "
        "| done − commit p50 / max | metric refresh after done, p50 |\n"
        "|---|---|---|---|---|---|\n"
        f"| {r['case']} | {r['requests']} "
        f"| {np.percentile(commit, 50):.2f} s / {np.percentile(commit, 95):.2f} s "
        f"| {np.percentile(done, 50):.2f} s / {np.percentile(done, 95):.2f} s "
        f"| **{np.median(gap):.3f} s** / {max(gap):.3f} s | {np.median(refresh):.2f} s |"
    )
    print(table, "\n")
    if not no_docs:
        stamp.write(DOC, "stream-lifecycle", table, r["command"], r)


def phases_markdown(case: str, requests: list[dict]) -> str:
    """Median seconds per phase, and its share of their sum (the metric refresh comes after
    the request is done: the latency to done is the sum without it)."""
    total = sum(statistics.median(q[p] for q in requests) for p in PHASES)
    lines = [
        f"| {p} | {what} | {statistics.median(q[p] for q in requests):.2f} s "
        f"| {statistics.median(q[p] for q in requests) / total:.0%} |"
        for p, what in PHASES.items()
    ]
    return "\n".join(
        [f"{case}, {len(requests)} single-sample requests: median seconds by phase.\n",
         "| phase | what | median | share |", "|---|---|---|---|", *lines]
    )  # fmt: skip


POSITIONS = {  # name: the share of the blocks it covers, by the request's (first) block
    "first tenth": (0.0, 0.1),
    "middle fifth": (0.4, 0.6),
    "last tenth": (0.9, 1.0),
    "all": (0.0, 1.0),
}


def positions_markdown(r: dict) -> str:
    """The served path's speed-up by where the sample sits: naive retrain over the median
    latency to the commit and to done, for the requests whose block lies in each share of the
    blocks (the targets name the first, middle and last block)."""
    lines = []
    for name, (lo, hi) in POSITIONS.items():
        qs = [q for q in r["requests_s"] if lo * r["blocks"] < q["block"] <= hi * r["blocks"]]
        if not qs:
            lines.append(f"| {name} | 0 | - | - | - | - |")
            continue
        commit = statistics.median(q["to commit"] for q in qs)
        done = statistics.median(q["to done"] for q in qs)
        lines.append(
            f"| {name} | {len(qs)} | {statistics.median(q['t'] for q in qs):g} "
            f"| {commit:.2f} s / {done:.2f} s | **{r['naive_s'] / commit:.1f}x** "
            f"| {r['naive_s'] / done:.1f}x |"
        )
    return "\n".join([
        f"{r['case']}: requests by the position of their block "
        f"(naive retrain {r['naive_s']:.1f} s).\n",
        "| position | requests | t (median) | latency to commit / done (median) "
        "| served speed-up to commit | to done |",
        "|---|---|---|---|---|---|", *lines])  # fmt: skip


def write_curve(files: list[Path], no_docs: bool) -> None:
    """The guard's trade-off: latency against accuracy, one row per run, and for a bound
    measured more than once (other ``--seed``) the mean and sd over its runs."""
    runs = sorted((json.loads(f.read_text()) for f in files),
                  key=lambda r: (-(r["max_accuracy_drop"] or 1), r.get("seed", 0)))  # fmt: skip
    lines = []
    for bound in dict.fromkeys(r["max_accuracy_drop"] for r in runs):
        same = [r for r in runs if r["max_accuracy_drop"] == bound]
        lines += [
            f"| {r['case']} | {bound} | {r['requests']} | {r.get('seed', 0)} "
            f"| {r['p50_s']:.2f} s / {r['p95_s']:.2f} s "
            f"| {one_in(r['naive_s'] / r['p95_s'])} | {r['stream_s'] / r['naive_s']:.2f} "
            f"| {r['guard_refusals']} | {100 * (r['acc_served'] - r['acc_naive']):+.2f} "
            f"| {r['val_reference']:.4f} → {r['val_last']:.4f} ({r['val_min']:.4f}) "
            f"| {r['commit']} |"
            for r in same
        ]
        if len(same) > 1:  # a target holds on the mean
            cost = [r["stream_s"] / r["naive_s"] for r in same]
            gap = [100 * (r["acc_served"] - r["acc_naive"]) for r in same]
            lines.append(
                f"| mean of {len(same)} | {bound} | | | | | {np.mean(cost):.2f} "
                f"| {np.mean([r['guard_refusals'] for r in same]):.1f} "
                f"| **{np.mean(gap):+.2f} ± {np.std(gap, ddof=1):.2f}** | | |"
            )
    table = "\n".join([
        "| data | forget.max_accuracy_drop | requests | seed | latency to done p50 / p95 "
        "| p95 / naive "
        "| stream total / naive | deletions the guard extended | served − naive, pp "
        "| validation acc: original → last (min) | measured at commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *lines])  # fmt: skip
    print(table)
    if not no_docs:
        names = " ".join(str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f)
                         for f in files)  # fmt: skip
        stamp.write(DOC, "stream-curve", table,
                    f"python benchmarks/stream.py --curve-from {names}")  # fmt: skip


if __name__ == "__main__":
    main()
