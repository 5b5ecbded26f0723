"""A request stream through the served path: N single-sample deletion requests at random
positions, each queued and drained by one long-running process (the drain-inbox flow, as the
scheduled deployment runs it), in a real DVC + git workspace.

    python benchmarks/stream.py                          # fashion-mnist/lenet5 B=500, 100 requests
    python benchmarks/stream.py --requests 20 --case purchase-mlp

Reports per-request latency (request queued -> marked done; the test metric and the
verification refresh follow after that, once per drain), p50 and p95, the total wall time against
one naive retrain in the same run, and after the stream: the served model's accuracy and its
consistency with a naive retrain on the final data, and how the validation accuracy (what the
guard judges, against the original) drifted.
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

sys.path.insert(0, str(Path(__file__).parent))
import stamp
from stored_training import CASES, ROOT, case_config

DOC = ROOT / "docs" / "benchmarks.md"


def workspace(name: str, folder: Path):
    """A DVC + git workspace of the case, trained with `dvc repro` (no verifying owner)."""
    shutil.rmtree(folder, ignore_errors=True)
    cfg = case_config(name, folder)
    raw = (folder / "params.yaml").read_text().replace("owner_block: 10", "owner_block: 0")
    (folder / "params.yaml").write_text(raw)
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
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the docs' table")
    args = parser.parse_args()
    folder = args.out / f"stream-{args.case}"
    case_cfg = workspace(args.case, folder)

    from obliviate.runtime import configure_prefect, quiet_console

    configure_prefect(folder)
    import flows.drain

    quiet_console()
    from obliviate import inbox
    from obliviate.audit import read_records
    from obliviate.compare import naive_config, predictions
    from obliviate.config import load_config
    from obliviate.partition import load_samples
    from obliviate.requests import SampleIndex
    from obliviate.store import ParamStore
    from obliviate.train import Trainer, stored_training

    params = folder / "params.yaml"
    cfg = load_config(params)
    assert cfg.paths.store == case_cfg.paths.store
    index = SampleIndex.of(cfg.paths.blocks)
    trained = np.flatnonzero(index.block > 0)
    rng = np.random.default_rng(0)
    picks = [str(index.ids[i]) for i in rng.choice(trained, args.requests, replace=False)]
    test = load_samples(cfg.paths.test)
    trainer = Trainer.from_config(cfg)
    original = ParamStore.open(cfg.paths.store).read_params(cfg.prepare.blocks)
    p_original = predictions(cfg, trainer, original)
    latencies, drains = [], []
    flows.drain.drain_flow(str(params))  # warm-up: Prefect's server, imports (empty inbox)
    start = time.perf_counter()
    for sid in picks:
        t0 = time.time()
        request = inbox.submit(cfg, [sid])
        s = time.perf_counter()
        flows.drain.drain_flow(str(params))
        drains.append(time.perf_counter() - s)
        done = inbox.get(cfg, request)
        assert done["status"] == "done", done
        latencies.append(done["finished_unix"] - t0)
    stream_s = time.perf_counter() - start
    t0 = time.perf_counter()
    naive = stored_training(naive_config(cfg), overwrite=True)
    naive_s = time.perf_counter() - t0
    served = ParamStore.open(cfg.paths.store).read_params(cfg.prepare.blocks)
    p_served = predictions(cfg, trainer, served)
    p_naive = predictions(cfg, trainer, naive.read_params(naive.n_blocks))
    records = read_records(cfg.paths.audit)
    val = [r["val_accuracy_after"] for r in records if r["val_accuracy_after"] is not None]
    ref = next(r["guard"]["reference_accuracy"] for r in records if r["guard"])
    retrain = [r["timings_s"]["retrain"] for r in records]
    row = {
        "case": f"{cfg.prepare.dataset}/{cfg.train.model} B={cfg.prepare.blocks}",
        "requests": args.requests, "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)), "naive_s": naive_s,
        "stream_s": stream_s, "drain_flow_p50_s": statistics.median(drains),
        "non_training_share_p50": float(np.median(1 - np.array(retrain) / np.array(latencies))),
        "acc_original": float((p_original == test.y).mean()),
        "acc_served": float((p_served == test.y).mean()),
        "acc_naive": float((p_naive == test.y).mean()),
        "consistency": float((p_served == p_naive).mean()), "val_reference": ref,
        "val_first": val[0], "val_last": val[-1], "val_min": min(val),
        "t_values": [r["t"] for r in records],
        "guard_refusals": sum(r["guard_rejections"] > 0 for r in records),
    }  # fmt: skip
    (args.out / "stream.json").write_text(json.dumps({**row, "latencies_s": latencies}, indent=1))
    table = (
        "| data | requests | latency p50 / p95 | naive retrain | p95 / naive "
        "| stream total / naive | non-training share (p50) | acc original / served / naive "
        "| cons(served, naive) "
        "| validation acc: original → first → last (min) | deletions the guard extended |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {row['case']} | {row['requests']} | {row['p50_s']:.2f} s / {row['p95_s']:.2f} s "
        f"| {naive_s:.1f} s | **1/{naive_s / row['p95_s']:.0f}** "
        f"| {stream_s / naive_s:.2f} | {row['non_training_share_p50']:.0%} "
        f"| {row['acc_original']:.4f} / {row['acc_served']:.4f} / {row['acc_naive']:.4f} "
        f"| {row['consistency']:.4f} | {ref:.4f} → {row['val_first']:.4f} → "
        f"{row['val_last']:.4f} ({row['val_min']:.4f}) | {row['guard_refusals']} |"
    )
    print(json.dumps(row), "\n", table)
    if not args.no_docs:
        stamp.write(
            DOC, "stream", table, "python " + " ".join(["benchmarks/stream.py", *sys.argv[1:]])
        )


if __name__ == "__main__":
    main()
