"""The stream with consolidation (`python benchmarks/stream.py --exact`): committed in seconds,
exact by a deadline. One trained DVC + git workspace, copied for each variant; in each, the same
single-sample requests at random positions, queued and drained one at a time by the drain flow
(as the scheduled deployment runs it), while consolidations run beside the stream in processes
of their own (as the consolidate deployment runs them) whenever a trigger fires:

- ``guard only``: today's served path, forget.on_refusal extend, no consolidation;
- ``extend`` and ``consolidate``: the two refusal policies with params.yaml's triggers;
- ``every N``: a consolidation every N approximate deletions (max_pending N, nothing else);
- ``drift``: the drift trigger alone.

Each variant ends with a final consolidation (none for guard only) and a naive retrain on the
final data: the served model must then be the naive one, byte for byte (sha256). Measured per
request: latency to the commit, and the served model's test accuracy against the naive model's
at that point, which is the model the last consolidation installed (a consolidation *is* the
naive retrain on the data it saw; before the first, the original model stands in). The whole
stream's cost counts the stream's wall time and every consolidation's, in naive retrains
(they overlap on two cores: an upper bound on the machine time). The replay check is timed
once: a spot check of 10 rows and a full replay, against the naive retrain.
"""

from __future__ import annotations

import json
import os
import re
import shlex
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

DOC_KEY = "stream-exact"
CURVE_KEY = "stream-exact-curve"


def variants(requests: int) -> dict[str, dict]:
    """name -> params overrides; the main table's variants, then the curve's."""
    off = {"max_pending": None, "max_drift": None, "max_age": "1000d"}
    return {
        "guard only": {"forget": {"on_refusal": "extend"}, "consolidate": off, "final": False},
        "extend": {"forget": {"on_refusal": "extend"}},
        "consolidate": {"forget": {"on_refusal": "consolidate"}},
        **{f"every {n}": {"consolidate": {**off, "max_pending": n}, "curve": True}
           for n in (10, 25, 50) if n < requests},
        "drift": {"consolidate": {**off, "max_drift": 0.005}, "curve": True},
    }  # fmt: skip


def run(args, folder: Path, case_cfg, picks: list[str], naive_s: float) -> dict:
    """Every variant on a copy of the trained workspace ``folder``."""
    results = {}
    for name, spec in variants(args.requests).items():
        if args.only and name not in args.only:
            continue
        ws = folder.with_name(f"{folder.name}-{name.replace(' ', '-')}")
        shutil.rmtree(ws, ignore_errors=True)
        shutil.copytree(folder, ws, symlinks=True)
        raw = yaml.safe_load((ws / "params.yaml").read_text())
        for section in ("forget", "consolidate"):
            raw[section].update(spec.get(section, {}))
        (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        print(f"== {name}", flush=True)
        results[name] = one_variant(ws, picks, naive_s, spec.get("final", True))
        results[name]["curve"] = spec.get("curve", False)
        shutil.rmtree(ws, ignore_errors=True)
    return results


def one_variant(ws: Path, picks: list[str], naive_s: float, final: bool) -> dict:
    import flows.deletion
    from obliviate import consolidation, lifecycle
    from obliviate.audit import read_records
    from obliviate.compare import naive_config
    from obliviate.config import load_config
    from obliviate.evaluate import test_accuracy
    from obliviate.hashing import model_hash
    from obliviate.store import ParamStore
    from obliviate.train import Trainer, stored_training

    params = ws / "params.yaml"
    cfg = load_config(params)
    trainer = Trainer.from_config(cfg)
    env = {**os.environ, "PREFECT_HOME": str(ws / ".prefect")}
    log = ws / "consolidations.log"

    def served_accuracy() -> float:
        store = ParamStore.open(cfg.paths.store)
        return test_accuracy(cfg, trainer, store.read_params(store.n_blocks))

    def naive_accuracies() -> list[float]:  # what each installed consolidation measured
        text = log.read_text() if log.is_file() else ""
        return [float(a) for a in re.findall(r"consolidated.*test accuracy ([0-9.]+)", text)]

    original = served_accuracy()
    background, runs, per_request = None, [], []  # runs: [start, end, exit code] per process

    def finished() -> None:  # note when the consolidation beside the stream has ended
        if background is not None and runs[-1][1] is None and background.poll() is not None:
            runs[-1][1:] = [time.perf_counter(), background.returncode]

    t_stream = time.perf_counter()
    for sid in picks:
        t0 = time.time()
        request = lifecycle.submit(cfg, [sid])
        out = flows.deletion.drain_flow(str(params))
        assert lifecycle.get(cfg, request)["status"] == "done"
        record = out.record
        naive_now = (naive_accuracies() or [original])[-1]
        accuracy = served_accuracy()
        per_request.append({
            "to commit": out.committed_unix - t0, "block": min(record["blocks"]),
            "t": record["t"], "refused": record["guard_rejections"] > 0,
            "served": accuracy, "naive": naive_now,
        })  # fmt: skip
        finished()
        running = background is not None and background.poll() is None
        if not running and consolidation.due(cfg) is not None:
            runs.append([time.perf_counter(), None, None])
            with log.open("a") as f:
                background = subprocess.Popen(
                    [sys.executable, "-m", "obliviate.cli", "consolidate", "--if-due", "--wait",
                     "3600", "--params", str(params)], stdout=f, stderr=subprocess.STDOUT, env=env,
                )  # fmt: skip
    stream_s = time.perf_counter() - t_stream
    if background is not None:
        background.wait()
        finished()
    t_final = time.perf_counter()
    if final:
        done = consolidation.run(cfg)
        with log.open("a") as f:
            f.write(done["sentence"] + "\n")
    final_s = time.perf_counter() - t_final
    records = read_records(cfg.paths.audit)
    full = [r for r in records if r.get("kind") == "consolidation" and not r.get("partial")]
    prefixes = [r for r in records if r.get("partial")]
    # every consolidation's wall time: the processes beside the stream (their Prefect start,
    # lock waits and catch-up rounds included) and the final one
    consolidation_s = sum(end - start for start, end, _ in runs) + final_s
    t0 = time.perf_counter()
    naive = stored_training(naive_config(cfg), overwrite=True)
    this_naive_s = time.perf_counter() - t0
    store = ParamStore.open(cfg.paths.store)
    served_hash = model_hash(store.read_params(store.n_blocks))
    naive_theta = naive.read_params(naive.n_blocks)
    commits = [q["to commit"] for q in per_request]
    gaps = [100 * (q["served"] - q["naive"]) for q in per_request]
    return {
        "requests": len(per_request),
        "commit_p50_s": float(np.percentile(commits, 50)),
        "commit_p95_s": float(np.percentile(commits, 95)),
        "naive_s": naive_s,
        "naive_here_s": this_naive_s,
        "stream_s": stream_s,
        "final_s": final_s,
        "consolidations": len(full),
        "prefix_installs": len(prefixes),
        "runs": len(runs),
        "runs_gave_up": sum(code not in (0, None) for _, _, code in runs),
        "consolidation_s": consolidation_s,
        "worst_gap_pp": float(min(gaps)),
        "median_gap_pp": float(statistics.median(gaps)),
        "refused": sum(q["refused"] for q in per_request),
        "final_identical": served_hash == model_hash(naive_theta),
        "final_served": served_accuracy(),
        "final_naive": test_accuracy(cfg, trainer, naive_theta),
        "exact_through": store.exact_through,
        "requests_s": per_request,
    }


def replay_costs(folder: Path) -> dict:
    """The auditor's checks on the trained (exact) workspace, timed: a spot check of 10 rows
    and a full replay."""
    from obliviate.config import load_config
    from obliviate.replay import replay

    cfg = load_config(folder / "params.yaml")
    t0 = time.perf_counter()
    spot = replay(cfg, sample=10, seed=0)
    spot_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = replay(cfg, every=True)
    full_s = time.perf_counter() - t0
    assert spot.passed and full.passed
    return {"spot_rows": len(spot.checked), "spot_s": spot_s, "full_s": full_s}


def one_in(ratio: float) -> str:
    return f"1/{ratio:.1f}" if ratio < 10 else f"1/{ratio:.0f}"


def write(r: dict, no_docs: bool) -> None:
    """The main table (the three policies) and the curve (consolidation intervals)."""
    from stream import DOC

    head = ("| variant | requests | refusals | consolidations (runs; prefix installs) "
            "| p50 / p95 to commit "
            "| p95 / naive | worst (median) interim served − naive, pp | whole stream, naive "
            "retrains | final: served = naive (sha256) | final acc served / naive |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")  # fmt: skip

    def row(name: str, v: dict) -> str:
        cost = (v["stream_s"] + v["consolidation_s"]) / r["naive_s"]
        same = {True: "**byte-identical**", False: "differ"}[v["final_identical"]]
        runs = f"{v['consolidations']} ({v.get('runs', 0)}; {v.get('prefix_installs', 0)})"
        return (f"| {name} | {v['requests']} | {v['refused']} | {runs} "
                f"| {v['commit_p50_s']:.2f} s / {v['commit_p95_s']:.2f} s "
                f"| {one_in(r['naive_s'] / v['commit_p95_s'])} "
                f"| {v['worst_gap_pp']:+.2f} ({v['median_gap_pp']:+.2f}) | {cost:.2f} "
                f"| {same} | {v['final_served']:.4f} / {v['final_naive']:.4f} |")  # fmt: skip

    main = [row(n, v) for n, v in r["variants"].items() if not v["curve"]]
    curve = [row(n, v) for n, v in r["variants"].items() if v["curve"]]
    costs = r["replay"]
    tail = (f"\n\nReplay checks on the trained store (B={r['blocks']}; naive retrain "
            f"{r['naive_s']:.1f} s, {r['naive_s'] / r['blocks']:.3f} s a block): a spot check "
            f"of {costs['spot_rows']} rows {costs['spot_s']:.1f} s "
            f"(**{costs['spot_s'] / (r['naive_s'] / r['blocks']):.1f} blocks of training**), "
            f"the full replay {costs['full_s']:.1f} s (**{costs['full_s'] / r['naive_s']:.2f}x "
            "a naive retrain**).")  # fmt: skip
    tables = {}
    if main:  # (a run of some variants writes the tables it has rows for)
        tables[DOC_KEY] = f"{r['case']}, {main_n(r)} requests:\n\n" + head + "\n".join(main) + tail
    if curve:
        tables[CURVE_KEY] = f"{r['case']}, {curve_n(r)} requests:\n\n" + head + "\n".join(curve)
    for key, body in tables.items():
        print(body, "\n")
        if not no_docs:
            stamp.write(DOC, f"{key}-{r['case_key']}", body, r["command"], r)


def main_n(r: dict) -> int:
    return max(v["requests"] for v in r["variants"].values() if not v["curve"])


def curve_n(r: dict) -> int:
    return max(v["requests"] for v in r["variants"].values() if v["curve"])


def main(args, folder: Path, case_cfg, picks: list[str], naive_s: float) -> None:
    costs = replay_costs(folder)
    result = {
        "case": f"{case_cfg.prepare.dataset}/{case_cfg.train.model} B={case_cfg.prepare.blocks}",
        "case_key": args.case, "blocks": case_cfg.prepare.blocks, "naive_s": naive_s,
        "commit": stamp.commit(), "params_sha256": stamp.params_digest(),
        "command": "python " + shlex.join(["benchmarks/stream.py", *sys.argv[1:]]),
        "replay": costs,
        "variants": run(args, folder, case_cfg, picks, naive_s),
    }  # fmt: skip
    kinds = "".join(sorted({"-curve" if v["curve"] else "-main"
                            for v in result["variants"].values()}))  # fmt: skip
    out = args.out / f"stream-exact-{args.case}-n{args.requests}{kinds}.json"
    out.write_text(json.dumps(result, indent=1))
    write(result, args.no_docs)
