"""The evaluation report is opt-in: `dvc repro` leaves it out, `dvc repro report/dvc.yaml` runs
it, and its cost is stated before it starts."""

import os
import subprocess
import sys

from conftest import SMALL, copy_project, prepare, write_params

from obliviate.config import load_config
from obliviate.report import estimated_blocks, estimated_cost, seconds_per_block


def test_dvc_repro_runs_the_report_when_asked(tmp_path):
    copy_project(tmp_path, "report")
    write_params(tmp_path, **SMALL)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = os.path.join(os.path.dirname(sys.executable), "dvc")

    def run(*args):
        done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run("git", "init", "-q")
    run(dvc, "init", "-q")
    # `dvc repro` itself (without the report) runs in tests/test_flows.py. The report depends on
    # the params check's mark, as every stage does; a dry run needs upstream outputs to exist.
    run(dvc, "repro", "check")
    asked = run(dvc, "repro", "--dry", "report/dvc.yaml")
    assert "Running stage 'report/dvc.yaml:report'" in asked and "> obliviate report" in asked
    assert "Running stage 'train'" not in asked  # the report builds its own scratch copy


def test_report_cost_is_estimated_from_the_grid(small_cfg):
    cfg = small_cfg
    b, r = cfg.prepare.blocks, cfg.report
    cells = len(r.samples) * len(r.positions)
    assert estimated_blocks(cfg) > b * (2 + cells)  # at least the build and the naive retrains
    bigger = load_config(cfg.root / "params.yaml", report={"epsilons": [*r.epsilons, 0.2, 0.3]})
    extra = 2 * cells * min(cfg.forget.max_blocks, b)
    assert estimated_blocks(bigger) == estimated_blocks(cfg) + extra
    assert seconds_per_block(cfg) is None  # nothing partitioned yet
    assert "train once to get a time estimate" in estimated_cost(cfg, None)
    prepare(cfg)
    seconds = seconds_per_block(cfg)
    assert seconds > 0
    assert f"up to {estimated_blocks(cfg)} blocks" in estimated_cost(cfg, seconds)


def test_prediction_cost_is_timed_by_the_fastest_pass(monkeypatch):
    from obliviate import report

    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # three passes: 3 s, 1 s, 2 s
    monkeypatch.setattr(report.time, "perf_counter", lambda: next(clock))
    calls = []
    result, seconds = report.fastest(lambda x: calls.append(x) or len(calls), "x", repeats=3)
    assert (result, seconds, calls) == (1, 1.0, ["x", "x", "x"])  # the first result, the min
