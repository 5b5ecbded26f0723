import os
import subprocess
import sys

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
