"""Shared fixtures. Tests shrink the project's real params.yaml instead of inventing configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from obliviate.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]

# The real config, shrunk: few blocks, one epoch, a tiny net still learns digits.
SMALL = {
    "prepare": {"blocks": 6},
    "train": {"epochs": 1, "batch_size": 32},
}


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


def merged(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = {**out.get(k, {}), **v}
    return out


@pytest.fixture
def prepared(small_cfg: Config) -> Config:
    """small_cfg with its blocks and test set written (no Prefect, no GX)."""
    prepare(small_cfg)
    return small_cfg


def prepare(cfg: Config) -> None:
    from obliviate.data import load_dataset
    from obliviate.partition import balanced_partition, write_blocks

    ds = load_dataset(cfg.prepare, cfg.root)
    blocks = balanced_partition(ds.train.y, cfg.prepare.blocks, cfg.prepare.seed)
    write_blocks(ds, blocks, cfg.paths.blocks, cfg.paths.test, cfg.prepare.model_dump(mode="json"))
