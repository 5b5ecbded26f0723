"""Data-parallel stored training with torchrun (2 CPU processes, gloo) against one process."""

import socket
import subprocess
import sys

import numpy as np
import pytest
import zarr
from conftest import prepare, write_params

from obliviate.config import load_config
from obliviate.errors import StoreError
from obliviate.store import ParamStore
from obliviate.train import stored_training
from obliviate.transaction import State

pytestmark = pytest.mark.slow

TOLERANCE = 1e-5  # ||P_k(2 processes) - P_k(1 process)|| / ||P_k||, per row (measured ~1e-7)
SMALL_DDP = {"prepare": {"blocks": 6}, "train": {"epochs": 2, "batch_size": 32}}


def torchrun(params, *extra) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           "-m", "obliviate.distributed", "--params", str(params), *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def rows(path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["params"][:]


def test_two_processes_match_one_within_tolerance_and_replay_exactly(tmp_path):
    single = load_config(write_params(tmp_path, **SMALL_DDP))
    prepare(single)
    stored_training(single)
    (tmp_path / "ddp").mkdir()
    shared = {"blocks": str(single.paths.blocks), "test": str(single.paths.test),
              "store": str(tmp_path / "ddp.zarr")}  # fmt: skip
    params = write_params(tmp_path / "ddp", **SMALL_DDP, paths=shared)
    ddp = load_config(params)
    run = torchrun(params)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "with 2 processes" in run.stdout
    one, two = rows(single.paths.store), rows(ddp.paths.store)
    assert one.shape == two.shape
    rel = np.linalg.norm(two - one, axis=1)[1:] / np.linalg.norm(one, axis=1)[1:]
    assert (rel < TOLERANCE).all(), rel
    assert (rel > 0).any()  # really a different computation, not the same process twice

    # replay exactness for this configuration: resume from P_3 reproduces P_4..P_6 bit for bit
    store = ParamStore.open(ddp.paths.store)
    store._set_completed(3)
    again = torchrun(params)
    assert again.returncode == 0, again.stderr[-3000:]
    assert np.array_equal(rows(ddp.paths.store), two)

    # a one-process resume of a two-process store is refused: it would not replay exactly
    store._set_completed(3)
    with pytest.raises(StoreError, match="trained by 2 process"):
        stored_training(load_config(params))

    # while another writer holds the lock, every rank stops at once with rank 0's sentence
    with State.of(ddp).lock():
        blocked = torchrun(params)
    assert blocked.returncode != 0 and "holds the writer lock" in blocked.stderr
    assert "--wait" not in blocked.stderr  # torchrun training has no --wait to suggest
    assert ParamStore.open(ddp.paths.store).completed == 3  # nothing written


def test_a_consolidation_under_torchrun_gives_the_bytes_of_stored_training_with_as_many(
    tmp_path,
):
    """A two-process store, a deletion (one process: its rows are approximate), then a
    consolidation under torchrun with two processes: every row equals two-process stored
    training on the reduced blocks, bit for bit. With one process it is refused."""
    from obliviate.consolidation import ConsolidationError, consolidate
    from obliviate.deletion import forget
    from obliviate.partition import load_block

    params = write_params(tmp_path, **SMALL_DDP, consolidate={"max_pending": None,
                                                              "max_drift": None})  # fmt: skip
    cfg = load_config(params)
    prepare(cfg)
    assert torchrun(params).returncode == 0
    record = forget(cfg, [str(load_block(cfg.paths.blocks, 2).ids[0])])
    assert record["tier"] == "approximate" and record["exact_through"] == 1  # not replayable
    with pytest.raises(ConsolidationError, match="torchrun --nproc-per-node 2"):
        consolidate(cfg)
    run = torchrun(params, "--consolidate")
    assert run.returncode == 0 and "with 2 processes" in run.stdout, run.stderr[-3000:]
    consolidated = rows(cfg.paths.store)
    assert ParamStore.open(cfg.paths.store).exact_through == 6
    (tmp_path / "naive").mkdir()
    naive = write_params(tmp_path / "naive", **SMALL_DDP, paths={
        "blocks": str(cfg.paths.blocks), "test": str(cfg.paths.test),
        "store": str(tmp_path / "naive.zarr")})  # fmt: skip
    assert torchrun(naive).returncode == 0
    assert np.array_equal(consolidated, rows(tmp_path / "naive.zarr"))
