"""Versioning through DVC in-process: DVC's lock state repaired after a kill, every DVC failure
one sentence, superseded objects purged from a DVC remote (a local folder here; S3 in
test_s3.py). A tiny git + DVC project with one stage; no training, except the recovery test."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import dvc_project, dvc_workspace, write_params

from obliviate import transaction, versioning
from obliviate.config import Config, load_config
from obliviate.versioning import VersioningError, commit, lock_outs, repair_dvc_locks

V1, V2 = b"version 1: holds the sample\n", b"version 2: without it\n"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template")
    write_params(root)
    (root / "out.bin").write_bytes(V1)
    dvc_project(root, {"make": ["out.bin"]})
    return root


@pytest.fixture
def project(template, tmp_path) -> Config:
    """A one-stage DVC project (output out.bin, version 1) with obliviate's params.yaml."""
    shutil.copytree(template, tmp_path / "project")
    return load_config(tmp_path / "project" / "params.yaml")


def new_version(cfg: Config) -> str:
    (cfg.root / "out.bin").write_bytes(V2)
    return commit(cfg, [cfg.root / "out.bin"], "obliviate: version 2")


def python(cfg: Config, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=cfg.root, env=env, capture_output=True, text=True)


def dvc(cfg: Config, *args: str) -> subprocess.CompletedProcess:
    return python(cfg, "-m", "dvc", *args)


def md5(content: bytes) -> str:
    return hashlib.md5(content).hexdigest()


def rwlock(cfg: Config) -> Path:
    return cfg.root / ".dvc" / "tmp" / "rwlock"


def holding(cfg: Config, pid: int) -> bytes:
    """An rwlock in DVC's format: process ``pid`` writes out.bin."""
    entry = {"pid": pid, "cmd": "dvc commit make"}
    return json.dumps({"read": {}, "write": {str(cfg.root / "out.bin"): entry}}).encode()


def dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def assert_versioned_and_dvc_works(cfg: Config) -> None:
    assert new_version(cfg) == "dvc+git"
    assert lock_outs(cfg.root)["make"] == [("out.bin", md5(V2))]
    json.loads(rwlock(cfg).read_bytes())  # DVC's format again
    status = dvc(cfg, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stderr


# --------------------------------------------------------------------------- DVC's lock state

KILLED_INSIDE_DVC_COMMIT = """
import json, os, signal, types
import dvc.rwlock
from dvc.repo import Repo
def killed(*args, **kwargs):  # DVC has just opened .dvc/tmp/rwlock for writing: it is empty
    os.kill(os.getpid(), signal.SIGKILL)
dvc.rwlock.json = types.SimpleNamespace(**{**vars(json), "dump": killed})
open("out.bin", "wb").write(b"version 2: without it\\n")
with Repo(".") as repo:
    repo.commit("make", force=True)
"""


def test_a_kill_inside_dvc_commit_breaks_dvc_and_the_next_commit_repairs_it(project):
    cfg = project
    killed = python(cfg, "-c", KILLED_INSIDE_DVC_COMMIT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert rwlock(cfg).read_bytes() == b""  # the measured failure
    broken = dvc(cfg, "status")
    assert broken.returncode != 0 and "RWLock" in broken.stderr
    assert_versioned_and_dvc_works(cfg)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00\xff{not json", b'{"write": [1, 2]}', "dead pid", "this process"],
    ids=["empty", "garbage", "not-dvc-format", "dead-pid", "own-pid"],
)
def test_a_broken_rwlock_is_repaired_and_the_commit_succeeds(project, content):
    cfg = project
    if content == "dead pid":
        content = holding(cfg, dead_pid())
    elif content == "this process":  # not inside DVC while it commits: a leftover
        content = holding(cfg, os.getpid())
    rwlock(cfg).write_bytes(content)
    assert_versioned_and_dvc_works(cfg)


def test_a_pid_reused_by_a_later_process_is_not_taken_for_the_holder(project):
    cfg = project
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rwlock(cfg).write_bytes(holding(cfg, later.pid))
        past = time.time() - 600  # the entry was written before that process started
        os.utime(rwlock(cfg), (past, past))
        assert_versioned_and_dvc_works(cfg)
    finally:
        later.kill()
        later.wait()


def test_a_live_dvc_process_of_someone_else_is_not_overruled(project):
    cfg = project
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rwlock(cfg).write_bytes(held := holding(cfg, other.pid))
        lock_before = (cfg.root / "dvc.lock").read_text()
        with pytest.raises(VersioningError, match=rf"dvc process {other.pid} .*wait for it"):
            new_version(cfg)
        assert rwlock(cfg).read_bytes() == held  # its entry stays
        assert (cfg.root / "dvc.lock").read_text() == lock_before
    finally:
        other.kill()
        other.wait()
    assert_versioned_and_dvc_works(cfg)  # once it is gone


def test_recovery_repairs_dvc_even_with_nothing_to_finish(project):
    cfg = project
    rwlock(cfg).write_bytes(b"")
    assert transaction.recover(cfg) == []
    assert dvc(cfg, "status").returncode == 0
    assert repair_dvc_locks(cfg.root) == []  # nothing left to repair


KILLED_HOLDING_THE_REPO_LOCK = """
import os, signal
from dvc.repo import Repo
Repo(".").lock.lock()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_hardlink_repo_lock_left_by_a_kill_is_one_sentence(project):
    cfg = project
    assert dvc(cfg, "config", "core.hardlink_lock", "true").returncode == 0
    for name in ("lock", "rwlock.lock"):  # DVC's OS-lock files of earlier runs block hardlinks
        (cfg.root / ".dvc" / "tmp" / name).unlink()
    killed = python(cfg, "-c", KILLED_HOLDING_THE_REPO_LOCK)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with pytest.raises(VersioningError, match=r"holds this project's lock.*remove them"):
        new_version(cfg)  # the lock file names no process: it cannot be told from a live one
    (cfg.root / ".dvc" / "tmp" / "lock").unlink()
    assert new_version(cfg) == "dvc+git"


# --------------------------------------------------------------------------- errors


def test_a_damaged_dvc_lock_or_dvc_yaml_is_one_sentence(project):
    cfg = project
    # not YAML (cut short, as a kill inside DVC's rewrite leaves it): restored from HEAD instead
    (cfg.root / "dvc.lock").write_text("stages: [\n  truncated")
    assert new_version(cfg) == "dvc+git"
    # YAML, but not DVC's shape (an edit, a bad merge): not ours to replace
    (cfg.root / "dvc.lock").write_text("stages:\n  make:\n    outs: 5\n")
    with pytest.raises(VersioningError, match=r"dvc.lock is damaged.*git checkout -- dvc.lock"):
        new_version(cfg)
    subprocess.run(["git", "checkout", "--", "dvc.lock"], cwd=cfg.root, check=True)
    (cfg.root / "dvc.yaml").write_text("stages: [\n  truncated")
    with pytest.raises(VersioningError, match=r"dvc could not commit stage\(s\) make \(.*dvc.yaml"):
        new_version(cfg)


# --------------------------------------------------------------------------- the DVC remote


def remote_objects(folder: Path) -> set[str]:
    return {f"{p.parent.name}{p.name}" for p in (folder / "files" / "md5").glob("*/*")}


def test_a_local_remote_loses_superseded_objects_and_a_broken_one_is_retried(
    project, tmp_path_factory
):
    cfg = project
    remote = tmp_path_factory.mktemp("remote")
    assert dvc(cfg, "remote", "add", "-d", "backup", str(remote)).returncode == 0
    assert dvc(cfg, "push").returncode == 0
    assert new_version(cfg) == "dvc+git"
    assert dvc(cfg, "push").returncode == 0
    assert remote_objects(remote) == {md5(V1), md5(V2)}

    # v2 is what dvc.lock points at now: only v1 goes
    got = versioning.purge_remote(cfg, [md5(V1), md5(V2)])
    assert got == {"remote_purge": "done", "purged_remote_objects": 1}
    assert remote_objects(remote) == {md5(V2)}
    assert "in sync" in dvc(cfg, "status", "-c").stdout
    assert versioning.purge_remote(cfg, [md5(V1)])["purged_remote_objects"] == 0  # idempotent

    # a remote that cannot be used: the purge stays pending, and recovery finishes it
    (remote / "files" / "md5" / md5(V1)[:2]).mkdir(exist_ok=True)
    (remote / "files" / "md5" / md5(V1)[:2] / md5(V1)[2:]).write_bytes(V1)  # pushed earlier
    assert dvc(cfg, "remote", "add", "-d", "-f", "backup", "ssh://127.0.0.1/x").returncode == 0
    got = versioning.purge_remote(cfg, [md5(V1)])
    assert got["remote_purge"] == "pending" and got["purged_remote_objects"] == 0
    assert got["remote_purge_error"].endswith("to retry.")
    pending = cfg.paths.state / "remote_purge.json"
    assert json.loads(pending.read_text()) == {"md5": [md5(V1)]}
    assert dvc(cfg, "remote", "add", "-d", "-f", "backup", str(remote)).returncode == 0
    assert transaction.recover(cfg) == []
    assert not pending.exists() and remote_objects(remote) == {md5(V2)}


def test_without_a_remote_the_purge_says_so(project):
    cfg = project
    got = versioning.purge_remote(cfg, [md5(V1)])
    assert got == {"remote_purge": "no remote", "purged_remote_objects": 0}
    assert not (cfg.paths.state / "remote_purge.json").exists()


# --------------------------------------------------------------------------- recovery


def test_recovery_after_a_kill_inside_dvc_finishes_the_deletion_and_purges(trained):
    """A deletion staged, then killed inside `dvc commit` (DVC's rwlock left empty): recovery
    repairs DVC, versions the new state and purges the old block from the cache."""
    from obliviate import lifecycle
    from obliviate.deletion import checks, compute, recover
    from obliviate.partition import load_block

    cfg = dvc_workspace(trained)
    sid = str(load_block(cfg.paths.blocks, 4).ids[0])
    old_block = (cfg.paths.blocks / "block_0004.npz").read_bytes()
    cached = versioning.dvc_cache_dir(cfg.root) / md5(old_block)[:2] / md5(old_block)[2:]
    assert cached.is_file()
    state = transaction.State.of(cfg)
    request = lifecycle.submit(cfg, [sid])
    lifecycle.start(cfg, lifecycle.claim(cfg), "del-killed")
    compute(cfg, "del-killed", {4: [sid]}, *checks(cfg))  # staged: the commit point is passed
    lifecycle.commit(cfg, "del-killed")
    rwlock(cfg).write_bytes(b"")  # the kill inside dvc commit
    with state.lock():
        assert recover(cfg) == (["del-killed"], [lifecycle.get(cfg, request)])
    assert lifecycle.get(cfg, request)["status"] == "done"
    assert not cached.exists()
    assert (cfg.paths.blocks / "block_0004.npz").read_bytes() != old_block
    status = dvc(cfg, "status")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    log = subprocess.run(["git", "log", "-1", "--format=%s"], cwd=cfg.root, capture_output=True,
                         text=True).stdout  # fmt: skip
    assert "forget request del-killed" in log


def test_a_stage_that_cannot_be_committed_is_named_before_anything_changes(project):
    from obliviate.versioning import require_versionable

    out = project.root / "out.bin"
    require_versionable(project, [out])  # the whole pipeline is here: fine
    out.unlink()  # a partial pipeline: dvc.lock records an output that is not here
    with pytest.raises(VersioningError, match=r"stage make records out.bin.*dvc checkout make"):
        require_versionable(project, [out])
    out.write_bytes(V1)
    (project.root / "dvc.yaml").write_text("stages: {}\n")  # the stage was removed from dvc.yaml
    with pytest.raises(VersioningError, match=r"dvc\.yaml no longer defines"):
        require_versionable(project, [out])
    require_versionable(project, [project.root / "other.bin"])  # no stage writes it: nothing


def test_a_dvc_lock_left_empty_by_a_kill_is_restored_from_head_before_the_commit(project):
    (project.root / "dvc.lock").write_text("")  # DVC rewrites it in place; a kill can leave this
    assert new_version(project) == "dvc+git"
    assert lock_outs(project.root)["make"] == [("out.bin", md5(V2))]  # restored, then updated
    assert "up to date" in dvc(project, "status").stdout
    subprocess.run(["git", "rm", "-q", "--cached", "dvc.lock"], cwd=project.root, check=True)
    subprocess.run(["git", "commit", "-qm", "untrack"], cwd=project.root, check=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})  # fmt: skip
    (project.root / "dvc.lock").write_text("stages:\n  make:\n    cmd: [")  # cut short
    with pytest.raises(VersioningError, match="git holds no earlier version"):
        new_version(project)
