"""Integrity: checksummed store chunks, missing chunks, block sha256, `obliviate fsck`.

The unit tests work in-process on the trained digits workspace; the CLI tests (slow: each runs a
Prefect flow) check that `evaluate` and `forget` stop with one sentence and exit 2, leaving every
file as it was, and that `fsck` names the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FORGET, prepare, write_params

from obliviate.config import Config, load_config
from obliviate.errors import StoreError


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One trained digits workspace (12 blocks, no DVC) per module; tests work on copies."""
    from obliviate.train import stored_training

    ws = tmp_path_factory.mktemp("trained")
    cfg = load_config(write_params(ws, **FORGET))
    prepare(cfg)
    stored_training(cfg)
    return ws


@pytest.fixture
def ws(template, tmp_path) -> Path:
    dest = tmp_path / "ws"
    shutil.copytree(template, dest)
    return dest


def cfg_of(ws: Path) -> Config:
    return load_config(ws / "params.yaml")


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(data))


def chunk(ws: Path, array: str, row: int) -> Path:
    return ws / "models" / "store.zarr" / array / "c" / str(row) / "0"


# Each corruption: (what it does to the workspace, words the one sentence must contain).
CORRUPTIONS = {
    "flipped byte in a chunk": (
        lambda ws: flip_byte(chunk(ws, "params", 5)),
        "row 5 of params is corrupt (its checksum does not match)",
    ),
    "missing chunk": (
        lambda ws: chunk(ws, "optimizer", 3).unlink(),
        "row 3 of optimizer has a missing chunk",
    ),
    "flipped byte in a block": (
        lambda ws: flip_byte(ws / "data" / "blocks" / "block_0004.npz", at=-300),
        "block_0004.npz does not match its sha256",
    ),
}


# --------------------------------------------------------------------------- in-process


def test_the_store_checksums_every_chunk_and_writes_empty_ones(ws):
    from obliviate.store import ParamStore

    store = ParamStore.open(cfg_of(ws).paths.store)
    assert [type(c).__name__ for c in store.params.compressors] == ["BloscCodec", "Crc32cCodec"]
    assert [type(c).__name__ for c in store.optimizer.compressors] == [
        "BloscCodec",
        "Crc32cCodec",
    ]
    # P_0's optimizer state is all zeros: written anyway, so a missing chunk is never legitimate
    assert not store.read(0)[1].any() and chunk(ws, "optimizer", 0).is_file()


@pytest.mark.parametrize(("name", "row"), [("flipped byte in a chunk", 5), ("missing chunk", 3)])
def test_a_damaged_row_raises_one_sentence_naming_row_and_fix(ws, name, row):
    from obliviate.store import ParamStore

    damage, words = CORRUPTIONS[name]
    cfg = cfg_of(ws)
    ParamStore.open(cfg.paths.store).read(row)  # fine before
    damage(ws)
    store = ParamStore.open(cfg.paths.store)
    with pytest.raises(StoreError, match="obliviate train --overwrite") as err:
        store.read(row)
    assert words in str(err.value) and "\n" not in str(err.value)
    store.read(row + 1)  # the other rows still read


def test_a_changed_block_is_refused_before_use(ws):
    from obliviate.partition import load_block

    cfg = cfg_of(ws)
    load_block(cfg.paths.blocks, 4)  # verified and remembered
    flip_byte(cfg.paths.blocks / "block_0004.npz", at=-300)
    with pytest.raises(StoreError, match="does not match its sha256"):
        load_block(cfg.paths.blocks, 4)
    (cfg.paths.blocks / "block_0004.npz").unlink()
    with pytest.raises(StoreError, match=r"block_0004\.npz is missing; restore the blocks"):
        load_block(cfg.paths.blocks, 4)


def test_fsck_is_clean_on_a_fresh_workspace_and_names_each_problem(ws):
    from obliviate.fsck import check

    cfg = cfg_of(ws)
    assert check(cfg) == []
    for damage, _ in CORRUPTIONS.values():
        damage(ws)
    # a broken audit chain, an interrupted deletion and a torn staging folder
    cfg.paths.audit.parent.mkdir(parents=True)
    records = [
        {"request_id": "del-1", "sample_id_hashes": [], "model_before": "a" * 64,
         "model_after": "b" * 64},
        {"request_id": "del-2", "sample_id_hashes": [], "model_before": "c" * 64,
         "model_after": "d" * 64},
    ]  # fmt: skip
    cfg.paths.audit.write_text("".join(json.dumps(r) + "\n" for r in records) + "{torn\n")
    (cfg.paths.state / "requests").mkdir(parents=True)
    interrupted = {"request_id": "req-3", "status": "running", "ids": ["x"], "order": 3,
                   "deletion": "del-3"}  # fmt: skip
    (cfg.paths.state / "requests" / "req-3.json").write_text(json.dumps(interrupted))
    (cfg.paths.state / "staging" / ".tmp-del-3").mkdir(parents=True)
    problems = check(cfg)
    expected = [
        "row 5 of params is corrupt",
        "row 3 of optimizer has a missing chunk",
        "block_0004.npz does not match its sha256",
        "deletion del-2 started from model cccccccccccc, not from the model bbbbbbbbbbbb",
        "deletions.jsonl:3 is not an audit record",
        "request req-3 is running: deletion del-3 was interrupted",
        ".tmp-del-3 is an incomplete staging folder",
    ]
    for words in expected:
        assert sum(words in p for p in problems) == 1, (words, problems)
    assert len(problems) == len(expected), problems
    assert all("\n" not in p for p in problems)


def test_fsck_finds_a_store_that_does_not_fit_its_blocks_and_a_wrong_index(ws):
    import numpy as np

    from obliviate.fsck import check
    from obliviate.partition import save_npz

    cfg = cfg_of(ws)
    manifest = json.loads((cfg.paths.blocks / "manifest.json").read_text())
    with np.load(cfg.paths.blocks / "index.npz") as z:
        index = {k: z[k] for k in z.files}
    index["block"] = index["block"][::-1].copy()
    save_npz(cfg.paths.blocks / "index.npz", **index)
    manifest["n_samples"] += 1
    (cfg.paths.blocks / "manifest.json").write_text(json.dumps(manifest))
    problems = check(cfg)
    assert any("index.npz does not list the samples" in p for p in problems), problems
    assert any("counts" in p and "but the blocks hold" in p for p in problems), problems


# --------------------------------------------------------------------------- the CLI


def run_cli(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(ws / ".prefect")
    return subprocess.run(
        [sys.executable, "-m", "obliviate.cli", *args, "--params", str(ws / "params.yaml")],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def snapshot(ws: Path) -> dict[str, str]:
    """sha256 of every file, except Prefect's own database and the writer's OS lock file (empty;
    taking the lock creates it): everything a command could damage."""
    out = {}
    for p in sorted(ws.rglob("*")):
        rel = p.relative_to(ws).as_posix()
        if p.is_file() and not rel.startswith(".prefect/") and rel != ".obliviate/writer.lock":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_stops_evaluate_and_forget_and_fsck_names_it(ws, name):
    from obliviate.partition import load_block

    damage, words = CORRUPTIONS[name]
    sid = str(load_block(ws / "data" / "blocks", 7).ids[0])
    damage(ws)
    before = snapshot(ws)
    for args in (("evaluate",), ("forget", sid)):
        r = run_cli(ws, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and words in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr + r.stdout
        assert snapshot(ws) == before, args
        lock = ws / ".obliviate" / "writer.lock"
        assert not lock.exists() or lock.stat().st_size == 0
    fsck = run_cli(ws, "fsck")
    assert fsck.returncode == 2 and words in fsck.stdout, fsck.stdout
    assert fsck.stdout.strip().count("\n") == 0  # one problem, one line
    assert snapshot(ws) == before


@pytest.mark.slow
def test_fsck_exits_0_on_a_clean_workspace_and_2_on_one_flipped_byte_anywhere(ws):
    """fsck through the CLI reads every row: clean, it says so and exits 0; a flipped byte in a
    middle row's optimizer state (which no deletion of a later block would read) is a problem
    line naming the row, and exit 2."""
    r = run_cli(ws, "fsck")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"fsck: {ws} is intact (store, blocks, manifest, audit, journal)"
    flip_byte(chunk(ws, "optimizer", 7))
    r = run_cli(ws, "fsck")
    assert r.returncode == 2 and r.stderr.strip() == f"fsck: 1 problem(s) in {ws}", r.stderr
    assert r.stdout.strip() == (
        f"{ws / 'models' / 'store.zarr'}: row 7 of optimizer is corrupt (its checksum does not "
        "match); restore it with `dvc checkout` or rebuild it with `obliviate train --overwrite`."
    )


def test_fsck_is_clean_after_deletions_and_finds_a_rewritten_audit_record(ws, monkeypatch):
    """Real deletions keep every invariant fsck checks (no false alarms); editing an audit
    record's model hash breaks the chain."""
    from obliviate.audit import KEY_ENV, read_records
    from obliviate.deletion import forget
    from obliviate.fsck import check
    from obliviate.partition import load_block

    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = cfg_of(ws)
    for k in (6, 3):
        forget(cfg, [str(load_block(cfg.paths.blocks, k).ids[0])])
    assert check(cfg) == []
    first, second = read_records(cfg.paths.audit)
    assert second["model_before"] == first["model_after"]
    first["model_after"] = "0" * 64
    cfg.paths.audit.write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
    assert [p for p in check(cfg) if "started from model" in p] == [
        f"{cfg.paths.audit}:2: deletion {second['request_id']} started from model "
        f"{second['model_before'][:12]}, not from the model 000000000000 the deletion before "
        "it left; restore it from git (`git checkout -- deletions.jsonl` in its folder)."
    ]
