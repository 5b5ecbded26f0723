"""Deletions in a real DVC + git workspace: purge, audit trail, versions, and SIGKILL recovery.

Slow: one template workspace is built with `dvc repro` per session and copied for each test.
"""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from e2e import BIN, assert_nowhere, env_for, files_containing, final_state, sh, unique_sample
from test_keyed_hashes import DIGITS_IDS, HEX64, hashes_in

from obliviate.audit import legacy_id_hash

pytestmark = pytest.mark.slow
pytest_plugins = ["e2e"]  # the session's template workspace


@pytest.fixture
def workspace(template, tmp_path) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(template, ws, symlinks=True)
    return ws


def test_cli_forget_purges_every_copy_versions_and_audits(workspace):
    ws = workspace
    sid, content = unique_sample(ws)
    holders = files_containing(ws, content)
    assert any("blocks" in p.parts for p in holders) and any("cache" in p.parts for p in holders)
    commits_before = int(sh(ws, "git", "rev-list", "--count", "HEAD").stdout)

    out = sh(ws, str(BIN / "obliviate"), "forget", sid)  # the direct path
    assert "forgot 1 sample(s)" in out.stdout and "Delta:" in out.stdout
    assert files_containing(ws, content) == []  # no byte of the sample, .dvc/cache included
    # one commit for the deletion, one for the metrics refreshed after it
    assert int(sh(ws, "git", "rev-list", "--count", "HEAD").stdout) == commits_before + 2
    log = sh(ws, "git", "log", "-2", "--format=%s").stdout.splitlines()
    assert "metrics after" in log[0] and "forget request" in log[1]
    assert sh(ws, "git", "status", "--porcelain").stdout.strip() == ""
    listing = sh(ws, str(BIN / "obliviate"), "audit", "--json").stdout.splitlines()
    assert len(listing) == 1 and sid not in listing[0]

    sid2, content2 = unique_sample(ws, block=9)
    # the queued path, from another folder naming params.yaml: DVC still versions this project
    queued = sh(ws.parent, str(BIN / "obliviate"), "request", sid2, "--params",
                str(ws / "params.yaml")).stdout.strip()  # fmt: skip
    drained = sh(ws.parent, str(BIN / "obliviate"), "drain", "--params", str(ws / "params.yaml"),
                 PREFECT_HOME=str(ws / ".prefect"))  # fmt: skip
    assert "1 request(s) done" in drained.stdout and queued.startswith("req-")
    assert int(sh(ws, "git", "rev-list", "--count", "HEAD").stdout) == commits_before + 4
    assert "up to date" in sh(ws, str(BIN / "dvc"), "status").stdout
    assert files_containing(ws, content2) == []

    # Neither id is left anywhere: the working tree, .dvc/cache, every object in git's history
    # (decompressed) and Prefect's database (flow parameters, logs, states, events, artifacts),
    # in any encoding the workspace uses (numpy: UTF-32; JSON and SQLite: UTF-8).
    assert any(".prefect" in p.parts for p in ws.rglob("*.db"))  # Prefect's database is here
    for gone in (sid, sid2):
        assert_nowhere(ws, gone)
    history = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=ws,
                             capture_output=True, check=True).stdout  # fmt: skip
    # and every id of the dataset, hashed without the key (plain sha256, or the old fixed-prefix
    # form), matches no stored hash: only the key (outside git) links a hash to an id
    stored = hashes_in(ws) | {m.decode() for m in HEX64.findall(history)}
    unkeyed = {legacy_id_hash(i) for i in DIGITS_IDS}
    unkeyed |= {hashlib.sha256(i.encode()).hexdigest() for i in DIGITS_IDS}
    assert stored and not stored & unkeyed
    assert ".obliviate" in (ws / ".gitignore").read_text()  # the key file is not in git

    again = sh(ws, str(BIN / "obliviate"), "forget", sid, check=False)
    assert again.returncode == 2 and "already forgotten" in again.stderr


FORGET_SCRIPT = """
import sys
from obliviate.config import load_config
from obliviate.deletion import forget
forget(load_config("params.yaml"), [sys.argv[1]])
"""
RECOVER_SCRIPT = """
from obliviate.config import load_config
from obliviate.deletion import drain
print(drain(load_config("params.yaml")).recovered)
"""


@pytest.fixture(scope="session")
def reference(template, tmp_path_factory):
    ws = tmp_path_factory.mktemp("reference") / "ws"
    shutil.copytree(template, ws, symlinks=True)
    sid, _ = unique_sample(ws)
    sh(ws, sys.executable, "-c", FORGET_SCRIPT, sid)
    return sid, final_state(ws)


@pytest.mark.parametrize(
    "point",
    [
        "during_retrain",
        "after_retrain",
        "before_commit",
        "after_store",
        "after_block",
        "after_audit",
        "after_commit",
    ],
)
def test_sigkill_then_recovery_gives_the_complete_new_state(workspace, reference, point):
    sid, want = reference
    crashed = sh(
        workspace, sys.executable, "-c", FORGET_SCRIPT, sid, check=False, OBLIVIATE_CRASH_AT=point
    )
    assert crashed.returncode == -9, crashed.stderr
    recovered = sh(workspace, sys.executable, "-c", RECOVER_SCRIPT)
    assert "del-" in recovered.stdout  # the journaled request was finished
    got = final_state(workspace)
    assert np.array_equal(got["rows"], want["rows"])
    assert got["ids"] == want["ids"] and sid not in got["ids"]
    assert got["models"] == want["models"]  # exactly one audit record, for the same model
    assert got["staging"] == [] and "up to date" in got["dvc"]


def test_concurrent_deletions_are_serialised_and_a_killed_holder_blocks_no_one(workspace):
    ws = workspace
    first, _ = unique_sample(ws, block=3)
    second, _ = unique_sample(ws, block=8)
    third, _ = unique_sample(ws, block=10)
    procs = [
        subprocess.Popen([sys.executable, "-c", FORGET_SCRIPT, sid], cwd=ws, env=env_for(ws),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for sid in (first, second)
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
    # a writer killed while holding the lock (mid-retraining) must not block the next one
    killed = sh(ws, sys.executable, "-c", FORGET_SCRIPT, third, check=False,
                OBLIVIATE_CRASH_AT="during_retrain")  # fmt: skip
    assert killed.returncode == -9
    state = final_state(ws)
    assert len(state["models"]) == 2  # both concurrent deletions recorded, none lost
    assert first not in state["ids"] and second not in state["ids"] and third in state["ids"]
    sh(ws, sys.executable, "-c", RECOVER_SCRIPT)  # takes the freed lock, finishes the third
    state = final_state(ws)
    assert len(state["models"]) == 3 and third not in state["ids"]
    assert "up to date" in state["dvc"]


def snapshot(ws: Path) -> dict[str, str]:
    """sha256 of every file outside git and DVC's scratch folder: blocks, store, metrics, cache,
    dvc.lock, the audit trail, the state folder."""
    skip = (ws / ".git", ws / ".dvc" / "tmp")
    return {
        str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(ws.rglob("*"))
        if p.is_file() and not any(p.is_relative_to(d) for d in skip)
    }


# A typo in each section of params.yaml: (section, key, bad value); None renames the key.
TYPOS = [
    ("paths", "naive_store", 5),
    ("prepare", "blocks", "many"),
    ("train", "lr", "fast"),
    ("train", "epochs", None),  # `epoch:` for `epochs:`
    ("evaluate", "batch_size", 0),
    ("verify", "alpha", 2),
    ("report", "epsilons", "small"),
    ("forget", "epsilon", "tiny"),
    ("consolidate", "max_age", "soon"),
    ("serve", "cron", "every day"),
]


@pytest.mark.parametrize(("section", "key", "bad"), TYPOS)
def test_a_params_typo_under_dvc_repro_is_one_sentence_and_changes_no_byte(
    workspace, section, key, bad
):
    """dvc.yaml's first stage (`obliviate check`) refuses the typo before DVC removes any
    stage's outputs, so blocks, store, metrics and dvc.lock keep every byte."""
    import yaml

    ws = workspace
    good = (ws / "params.yaml").read_text()
    raw = yaml.safe_load(good)
    if bad is None:
        raw[section][key[:-1]] = raw[section].pop(key)
    else:
        raw[section][key] = bad
    before, head = snapshot(ws), sh(ws, "git", "rev-parse", "HEAD").stdout
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    failed = sh(ws, str(BIN / "dvc"), "repro", check=False)
    (ws / "params.yaml").write_text(good)
    assert failed.returncode != 0
    named = key[:-1] if bad is None else key
    ours = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and f"'{section}.{named}'" in ours[0], failed.stderr
    assert ours[0].endswith(".") and "Traceback" not in failed.stderr
    assert snapshot(ws) == before  # not one byte lost or changed, .dvc/cache included
    assert sh(ws, "git", "rev-parse", "HEAD").stdout == head
    assert "up to date" in sh(ws, str(BIN / "dvc"), "status").stdout


def test_a_wrong_type_for_a_path_dvc_yaml_names_stops_dvc_before_anything_runs(workspace):
    """A path that dvc.yaml interpolates is read by DVC first: DVC refuses it, nothing runs."""
    ws = workspace
    good = (ws / "params.yaml").read_text()
    before = snapshot(ws)
    (ws / "params.yaml").write_text(good.replace("blocks: data/blocks", "blocks: 5", 1))
    failed = sh(ws, str(BIN / "dvc"), "repro", check=False)
    (ws / "params.yaml").write_text(good)
    assert failed.returncode != 0 and "Running stage" not in failed.stdout
    assert snapshot(ws) == before
