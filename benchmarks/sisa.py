"""SISA against obliviate and naive retraining (a table like the paper's Table VII).

Same data, model, recipe and per-sample epoch budget; SISA's S shards x R slices reuse
obliviate's B = S*R balanced blocks (`obliviate.report.comparison`). For one deletion (a sample
of the middle block) it measures accuracy after the deletion, the retraining speed-up over
naive (measured wall time), the prediction cost on the test set, and the checkpoint storage.

    python benchmarks/sisa.py                       # both cases, S in 5 and 10, ~10 min
    python benchmarks/sisa.py --case purchase-mlp --shards 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import stamp
from stored_training import CASES, ROOT, case_config

from obliviate import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), action="append")
    parser.add_argument("--shards", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the docs' table")
    args = parser.parse_args()
    rows = []
    for name in args.case or list(CASES):
        workdir = args.out / f"sisa-{name}"
        cfg = case_config(name, workdir / "ws")
        report.build(cfg)
        report.snapshot(cfg, workdir / "pristine")
        rows += report.comparison(cfg, args.shards, workdir / "pristine")
        print(report.comparison_markdown(rows), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sisa.json").write_text(json.dumps(rows, indent=1))
    table = report.comparison_markdown(rows)
    (args.out / "sisa.md").write_text(table + "\n")
    print(table)
    if not args.no_docs:
        command = "python " + " ".join(["benchmarks/sisa.py", *sys.argv[1:]])
        stamp.write(ROOT / "docs" / "benchmarks.md", "sisa", table, command)


if __name__ == "__main__":
    main()
