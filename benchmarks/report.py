"""The evaluation report of the default params.yaml (what `obliviate report` measures), written
into docs/report.md with its stamp.

    python benchmarks/report.py          # digits, B=20: a few minutes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import stamp

from obliviate import report
from obliviate.config import load_config

ROOT = stamp.ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "report")
    args = parser.parse_args()
    cfg = load_config(ROOT / "params.yaml")
    r = cfg.report
    grid, comparison = report.run_report(
        cfg, r.epsilons, r.samples, r.positions, r.shards, args.out
    )  # on a scratch copy, removed again
    command = "python benchmarks/report.py"
    doc = ROOT / "docs" / "report.md"
    stamp.write(doc, "report-grid", report.grid_markdown(grid), command)
    stamp.write(doc, "report-comparison", report.comparison_markdown(comparison), command)


if __name__ == "__main__":
    main()
