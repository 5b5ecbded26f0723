"""The report flow: measure the grid and the SISA comparison on a scratch copy, write them."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from obliviate import report
from obliviate.config import Config
from tasks import NO_CACHE


@task(**NO_CACHE)
def measure(cfg: Config) -> tuple[list[dict], list[dict]]:
    r = cfg.report
    scratch = cfg.paths.state / "report-scratch"
    return report.run_report(cfg, r.epsilons, r.samples, r.positions, r.shards, scratch)


@task(retries=1, retry_delay_seconds=2, **NO_CACHE)
def write(cfg: Config, grid: list[dict], comparison: list[dict]) -> str:
    path = report.write_report(grid, comparison, cfg.paths.reports / "evaluation",
                               "obliviate report  (or: dvc repro report/dvc.yaml)")  # fmt: skip
    create_markdown_artifact(path.read_text(), key="evaluation-report")
    return str(path)


@flow(name="report")
def report_flow(cfg: Config) -> str:
    grid, comparison = measure(cfg)
    return write(cfg, grid, comparison)
