"""End to end through the CLI, Prefect (ephemeral local server) and DVC. Slow: tens of seconds."""

import json
import os
import subprocess
import sys

import pytest
import zarr
from conftest import SMALL, copy_project, write_params

pytestmark = pytest.mark.slow


def cli(*args, cwd):
    env = {**os.environ, "PREFECT_HOME": str(cwd / ".prefect")}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "obliviate.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_pipeline_flow_partitions_trains_and_evaluates(tmp_path):
    write_params(tmp_path, **{**SMALL, "train": {"epochs": 5}})  # enough steps to learn
    result = cli("run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    metrics = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    # digits has 10 balanced classes: chance is 0.1
    assert metrics["checkpoint"] == SMALL["prepare"]["blocks"] and metrics["accuracy"] > 0.5
    params = zarr.open(str(tmp_path / "models" / "store.zarr"), mode="r")["params"]
    assert params.shape[0] == SMALL["prepare"]["blocks"] + 1
    info = cli("info", "--json", cwd=tmp_path)
    assert json.loads(info.stdout)["completed"] == SMALL["prepare"]["blocks"]


def test_impossible_partition_fails_the_flow_cleanly_and_writes_nothing(tmp_path):
    write_params(tmp_path, prepare={"blocks": 500})  # digits has ~140 samples of its rarest class
    result = cli("partition", cwd=tmp_path)
    assert result.returncode == 2
    assert "set prepare.blocks to at most" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "data").exists()


def test_dvc_repro_builds_the_default_pipeline(tmp_path):
    copy_project(tmp_path, "report")
    write_params(tmp_path, **SMALL)
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / ".prefect"),
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
    }
    dvc = os.path.join(os.path.dirname(sys.executable), "dvc")

    def run(*args):
        return subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )

    assert run("git", "init", "-q").returncode == 0
    assert run(dvc, "init", "-q").returncode == 0
    repro = run(dvc, "repro")
    assert repro.returncode == 0, repro.stdout + repro.stderr
    assert "Running stage 'report" not in repro.stdout
    assert not (tmp_path / "reports" / "evaluation").exists()
    status = run(dvc, "status", "dvc.yaml")  # the default pipeline; the report stays pending
    assert "up to date" in status.stdout, status.stdout
    shown = json.loads(run(dvc, "metrics", "show", "--json").stdout)
    metrics = {os.path.basename(k): v["data"] for k, v in shown[""]["data"].items()}
    from obliviate.config import load_config
    from obliviate.evaluate import evaluate_store

    served = evaluate_store(load_config(tmp_path / "params.yaml"))
    assert metrics["evaluate.json"] == served  # DVC shows the served model's test accuracy
    assert metrics["original.json"]["accuracy"] == served["accuracy"]  # no deletion yet
    assert metrics["verify.json"]["status"] == "not_requested"  # the owner is still in the data
