import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, write_params


def run_cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "obliviate.cli", *args],
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys; from typer.testing import CliRunner; from obliviate.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "heavy = {'torch', 'torchvision', 'great_expectations', 'prefect', 'zarr', 'dvc'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_params_give_one_sentence_and_write_nothing(tmp_path):
    params = write_params(tmp_path, train={"epochz": 1})
    result = run_cli("partition", "--params", str(params))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "unknown key 'train.epochz'" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_info_without_store_is_a_clear_error(tmp_path):
    result = run_cli("info", "--params", str(write_params(tmp_path)))
    assert result.returncode == 2 and "run `obliviate train` first" in result.stderr


def test_serve_refuses_a_bad_schedule_and_a_missing_server_in_one_sentence(tmp_path):
    params = str(write_params(tmp_path))
    bad = run_cli("serve", "--cron", "every minute", "--params", params)
    assert bad.returncode == 2 and "must be a 5-field cron schedule" in bad.stderr
    out_of_range = run_cli("serve", "--cron", "99 * * * *", "--params", params)  # 5 fields
    assert out_of_range.returncode == 2 and "with valid values" in out_of_range.stderr
    no_server = run_cli("serve", "--params", params)  # PREFECT_API_URL unset: ephemeral only
    assert no_server.returncode == 2 and "needs a Prefect server" in no_server.stderr
    for r in (bad, out_of_range, no_server):
        assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_a_long_delta_series_prints_as_a_short_summary(tmp_path):
    """A first-block deletion at B=500 that retrains to the end has 500 Delta values: `forget`
    prints the first and last three and the count between, with t; the record keeps them all."""
    from obliviate.cli import _deletion_lines, delta_summary
    from obliviate.config import load_config

    deltas = [100.0 / (k + 1) for k in range(500)]
    assert delta_summary(deltas) == "100, 50, 33.3, ... (494 more) ..., 0.201, 0.2, 0.2"
    assert delta_summary(deltas[:7]) == "100, 50, 33.3, 25, 20, 16.7, 14.3"  # few: all of them
    sweep = {"request_id": "del-x", "retrained_blocks": 500, "first_block": 1, "stop_block": 500,
             "t": 499, "reason": "end_of_store", "deltas": deltas, "guard": None}  # fmt: skip
    cfg = load_config(write_params(tmp_path))
    lines = _deletion_lines(cfg, {**sweep, "sweeps": [sweep], "versioned": "dvc+git"}, 1, 88.8)
    assert "(t=499, end_of_store); Delta: 100, 50, 33.3, ... (494 more) ..." in lines
    assert max(map(len, lines.splitlines())) < 200


def test_poor_model_warning_needs_accuracy_clearly_above_the_majority_class():
    from obliviate.evaluate import poor_model_warning

    m = {"majority_rate": 0.5, "n_test": 400}  # two standard errors: 0.05
    assert poor_model_warning({**m, "accuracy": 0.56}) is None
    line = poor_model_warning({**m, "accuracy": 0.54})
    assert "0.5400" in line and "0.5000" in line and "\n" not in line
    assert poor_model_warning({"accuracy": 0.5, "n_test": 10}) is None  # no rate: no claim
    big = {"majority_rate": 0.9, "n_test": 10**6}  # at least one point, however large n is
    assert poor_model_warning({**big, "accuracy": 0.905}) is not None


@pytest.mark.slow
def test_train_and_evaluate_warn_when_the_model_is_no_better_than_the_majority_class(tmp_path):
    params = str(write_params(
        tmp_path, prepare={"blocks": 2}, train={"epochs": 1, "lr": 1e-9},
        verify={"owner_block": 0},
    ))  # fmt: skip
    assert run_cli("partition", "--params", params).returncode == 0
    trained, evaluated = (run_cli(c, "--params", params) for c in ("train", "evaluate"))
    metrics = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert 0.09 < metrics["majority_rate"] < 0.12  # digits: ten classes of about 180
    for done in (trained, evaluated):
        assert done.returncode == 0, done.stderr
        lines = [x for x in done.stderr.splitlines() if x.startswith("warning:")]
        assert len(lines) == 1, done.stderr
        assert f"majority-class rate {metrics['majority_rate']:.4f}" in lines[0]
        assert f"test accuracy {metrics['accuracy']:.4f}" in lines[0]
