"""The source table's CSV and Parquet rows (tests/source_rows.py): each through `dvc repro`,
`obliviate forget <id>`, `audit` and `export`, or refused in one sentence.

Slow: each row builds a DVC + git workspace and runs the CLI as a user would (about a minute).
"""

import pytest
from source_rows import run_row

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "row", ["csv-text-ids", "csv-numeric-ids", "csv-missing-value", "parquet-nullable"]
)
def test_a_source_goes_through_dvc_repro_forget_audit_and_export(tmp_path, row):
    run_row(tmp_path, row)
