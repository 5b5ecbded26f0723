"""Shared fixtures. Tests shrink the project's real params.yaml instead of inventing configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from obliviate.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]

# A drain starts a consolidation in a process of its own when a trigger fires; the tests start
# theirs themselves (tests/test_exact.py), so the automatic triggers are off. (The deadline,
# consolidate.max_age, is a day and a half: no test lives that long.)
MANUAL_CONSOLIDATION = {"max_pending": None, "max_drift": None}
# The real config, shrunk: few blocks, one epoch, a tiny net still learns digits.
SMALL = {
    "prepare": {"blocks": 6},
    "train": {"epochs": 1, "batch_size": 32},
    "forget": {"min_blocks": 2, "max_blocks": 6},
    "verify": {"owner_block": 3, "owner_samples": 40},
    "consolidate": MANUAL_CONSOLIDATION,
}
# For deletions: enough blocks that the stop rule can stop before the end.
FORGET = {
    "prepare": {"blocks": 12},
    "train": {"epochs": 1, "batch_size": 32},
    "forget": {"min_blocks": 4, "max_blocks": 8, "epsilon": 0.05},
    "verify": {"owner_samples": 40},  # the count these tests were written for
    "consolidate": MANUAL_CONSOLIDATION,
}


class Interrupted(Exception):
    """Stands in for a crash in the middle of stored training."""


def crash_after(block: int):
    """An ``on_block`` callback for stored_training that crashes once ``block`` is stored."""

    def on_block(k: int, n: int) -> None:
        if k == block:
            raise Interrupted

    return on_block


def copy_project(folder: Path, *extra: str) -> None:
    """What a DVC project of obliviate holds besides params.yaml: dvc.yaml, the code it depends
    on, an empty audit trail (the prepare stage reads it), and ``extra`` items (``report``)."""
    import shutil

    for item in ("dvc.yaml", "obliviate", *extra):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, folder / item)
    (folder / "audit").mkdir(exist_ok=True)
    (folder / "audit" / "deletions.jsonl").touch()


def write_params(folder: Path, **sections: dict) -> Path:
    """Copy the real params.yaml into ``folder`` with some keys replaced; return its path."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def small_cfg(tmp_path: Path) -> Config:
    """The default pipeline (digits, lenet5) shrunk, with every path inside tmp_path."""
    return load_config(write_params(tmp_path, **SMALL))


@pytest.fixture
def prepared(small_cfg: Config) -> Config:
    """small_cfg with its blocks and test set written (no Prefect, no GX)."""
    prepare(small_cfg)
    return small_cfg


def prepare(cfg: Config) -> None:
    from obliviate.data import load_dataset
    from obliviate.partition import partition_dataset

    ds = load_dataset(cfg.prepare, cfg.root)
    partition_dataset(ds, cfg.prepare, cfg.paths.blocks, cfg.paths.test)


@pytest.fixture
def trained(tmp_path: Path) -> Config:
    """A digits workspace with blocks and a complete store, ready for deletions (no DVC)."""
    from obliviate.train import stored_training

    cfg = load_config(write_params(tmp_path, **FORGET))
    prepare(cfg)
    stored_training(cfg)
    return cfg


GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def dvc_project(root: Path, stages: dict[str, list[str]]) -> None:
    """Make ``root`` a git + DVC project whose dvc.yaml has these stages (name: outputs), as
    `dvc repro` would leave it: outputs (already written) cached and in dvc.lock, all committed.
    The stages' commands never run: no training twice."""
    import contextlib
    import subprocess

    from dvc.repo import Repo

    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    Repo.init(str(root)).close()
    dvc_yaml = {"stages": {name: {"cmd": "false", "outs": outs} for name, outs in stages.items()}}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    (root / ".gitignore").write_text("/.obliviate/\n")
    with contextlib.chdir(root), Repo(str(root)) as repo:
        for name in stages:
            repo.commit(name, force=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", "baseline"], cwd=root, check=True)


def dvc_workspace(cfg: Config) -> Config:
    """A trained workspace (the ``trained`` fixture) as a DVC project: blocks, test set, store."""
    rel = {k: str(getattr(cfg.paths, k).relative_to(cfg.root)) for k in ("blocks", "test", "store")}
    dvc_project(cfg.root, {"prepare": [rel["blocks"], rel["test"]], "train": [rel["store"]]})
    return cfg


# The longest modules, longest first. `make test` runs pytest-xdist with --dist loadfile and
# --no-loadscope-reorder, so whole modules go to its two workers in this collection order
# (xdist's default orders them by test count, which put these last and left one worker idle
# while the other finished them).
LONGEST_FIRST = (
    "test_deletion_e2e.py",
    "test_bad_inputs.py",
    "test_sources_tables.py",
    "test_sources_arrays.py",
    "test_sources_e2e.py",
    "test_random_kill.py",
    "test_exact.py",
    "test_s3.py",
    "test_flows.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a module
