"""Versioning a change to the workspace: DVC (in-process, through its Python API) and one git
commit.

A deletion rewrites the outputs of some DVC stages (the blocks, the store); ``commit`` records
exactly the stages whose outputs it names, as `dvc commit --force STAGE` would, then commits
dvc.lock and the audit trail to git. DVC runs in this process: a long-running worker pays its
import once, not a subprocess per deletion. Every failure is a VersioningError (one sentence).

Crash safety. DVC rewrites its own lock state in place: a process killed inside `dvc commit`
can leave ``.dvc/tmp/rwlock`` empty or naming a dead process, and every later DVC command then
fails. ``repair_dvc_locks`` puts it right before obliviate runs DVC; it is called under
obliviate's writer lock, so no obliviate process is inside DVC at that moment. The repo lock
``.dvc/tmp/lock`` needs no repair: DVC takes it as an OS file lock, which a killed holder frees
(with ``core.hardlink_lock`` it stays, and cannot be told from a live holder's: one sentence).

The purge: ``purge_cache`` deletes the objects a deletion superseded from the DVC cache by hash,
``purge_remote`` from the project's default DVC remote, as `dvc gc --cloud` does (through DVC's
object database for that remote: S3, GCS, a folder ...), keeping what it could not reach
pending for the next try.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml

from obliviate.config import Config
from obliviate.errors import ObliviateError
from obliviate.faults import crashpoint

log = logging.getLogger(__name__)


LOCK_BACKUP = "dvc.lock.before"  # in the state folder, while DVC rewrites dvc.lock


class VersioningError(ObliviateError):
    """DVC or git could not record the new version."""


class RemoteError(VersioningError):
    """The project's DVC remote could not be purged (unreachable, misconfigured)."""


def lock_outs(root: Path) -> dict[str, list[tuple[str, str]]]:
    """{stage: [(output path, md5)]} from dvc.lock ({} without one); VersioningError when it is
    damaged (a kill while DVC rewrote it, a bad merge)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        return {
            name: [(os.path.normpath(o["path"]), o.get("md5", "")) for o in s.get("outs", [])]
            for name, s in stages.items()
        }
    except (yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise VersioningError(
            f"{lock} is damaged ({type(exc).__name__}: {_first_line(exc)}); restore it with "
            "`git checkout -- dvc.lock` and run the command again."
        ) from None


def stages_writing(root: Path, paths: list[Path]) -> list[str]:
    """Stages in dvc.lock (that is: that ran here) whose outputs include one of ``paths``."""
    wanted = {os.path.relpath(p, root) for p in paths}
    return sorted(
        name for name, outs in lock_outs(root).items() if wanted & {path for path, _ in outs}
    )


def require_versionable(cfg: Config, paths: list[Path]) -> None:
    """Before a deletion changes anything: the DVC stages that write ``paths`` can be committed
    here. Each is still defined in dvc.yaml and every dep and out dvc.lock records for it exists
    (a partial pipeline, or a file deleted by hand, would make `dvc commit` fail only after the
    store and blocks had changed). Else VersioningError, naming the stage and the path."""
    root = cfg.root
    if not is_dvc_project(root):
        return
    stages = stages_writing(root, paths)
    if not stages:
        return
    try:
        defined = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
        locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError) as exc:
        raise VersioningError(
            f"dvc.yaml or dvc.lock cannot be read ({_first_line(exc)}); restore them with `git "
            "checkout -- dvc.yaml dvc.lock` and run the command again."
        ) from None
    for name in stages:
        if name not in defined:
            raise VersioningError(
                f"dvc.lock records stage {name}, which dvc.yaml no longer defines, so a deletion "
                "could not be versioned; restore dvc.yaml (`git checkout -- dvc.yaml`) and run "
                "the command again."
            )
        for entry in [*locked[name].get("deps", []), *locked[name].get("outs", [])]:
            if not (root / entry["path"]).exists():
                raise VersioningError(
                    f"stage {name} records {entry['path'][:80]}, which does not exist here, so a "
                    f"deletion could not be versioned; restore it (`dvc checkout {name}` or `dvc "
                    f"repro {name}`) and run the command again."
                )


def is_dvc_project(root: Path) -> bool:
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def commit(cfg: Config, paths: list[Path], message: str) -> str:
    """DVC-commit the stages that write ``paths``; git-commit dvc.lock and the audit trail.

    Call under obliviate's writer lock (it repairs DVC's lock state first). Returns what was
    versioned: "no DVC project", "dvc", "dvc+git" or "dvc+git (nothing new)" (a redo after the
    commit already happened)."""
    root = cfg.root
    if not is_dvc_project(root):
        return "no DVC project"
    restore_dvc_lock(root, cfg.paths.state)
    stages = stages_writing(root, paths)
    crashpoint("before_dvc_commit")
    if stages:
        backup = cfg.paths.state / LOCK_BACKUP  # DVC rewrites dvc.lock in place: keep it whole
        backup.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "dvc.lock", backup.with_name(f".{LOCK_BACKUP}.tmp"))
        os.replace(backup.with_name(f".{LOCK_BACKUP}.tmp"), backup)
        with _dvc(root, f"commit stage(s) {', '.join(stages)}") as repo:
            _repair(repo)
            for stage in stages:
                repo.commit(stage, force=True)
        backup.unlink()
    if _git(root, "rev-parse", "--is-inside-work-tree", check=False) != 0:
        return "dvc"
    files = [p for p in ("dvc.lock", os.path.relpath(cfg.paths.audit, root)) if (root / p).exists()]
    _git(root, "add", "--", *files)
    if _git(root, "diff", "--cached", "--quiet", "--", *files, check=False) == 0:
        return "dvc+git (nothing new)"
    crashpoint("before_git_commit")
    _git(root, "commit", "--quiet", "-m", message, "--", *files)
    return "dvc+git"


# --------------------------------------------------------------------------- DVC in-process


@contextlib.contextmanager
def _dvc(root: Path, doing: str) -> Iterator:
    """An open DVC Repo of ``root``; whatever DVC raises becomes one VersioningError sentence."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from dvc.repo import Repo
    from flufl.lock import LockError as HardlinkLockError

    logging.getLogger("dvc").setLevel(logging.WARNING)  # not "Updating lock file" on our output
    try:
        # DVC resolves targets and paths against the working directory: work from the project
        with contextlib.chdir(root), Repo(str(root)) as repo:
            yield repo
    except (LockError, HardlinkLockError):
        raise VersioningError(
            f"dvc could not {doing}: another dvc process holds this project's lock "
            f"({root / '.dvc' / 'tmp'}); wait for it to finish and run the command again (with "
            "core.hardlink_lock set, a killed dvc leaves .dvc/tmp/lock or rwlock.lock behind: "
            "remove them once no dvc process runs)."
        ) from None
    except (DvcException, OSError) as exc:
        raise VersioningError(
            f"dvc could not {doing} ({_first_line(exc)}); fix the DVC workspace (`dvc status`) "
            "and run the command again to finish."
        ) from None


def repair_dvc_locks(root: Path, state: Path | None = None) -> list[str]:
    """Repair DVC's lock state after a killed DVC process (see the module docstring); returns
    what was repaired. Call under obliviate's writer lock. VersioningError when a live DVC
    process of someone else holds a lock here."""
    if not is_dvc_project(root):
        return []
    restored = restore_dvc_lock(root, state)
    with _dvc(root, "read its lock state") as repo:
        return restored + _repair(repo)


def restore_dvc_lock(root: Path, state: Path | None = None) -> list[str]:
    """DVC rewrites dvc.lock in place, so a process killed inside `dvc commit` can leave it
    empty or cut short, and a cut can still parse (a stage or a hash missing). ``commit`` keeps
    the file as it was before DVC touched it in <state>/dvc.lock.before, removed once the commit
    is done: if it is still there, the commit was interrupted and it is put back (the `dvc commit
    --force` that follows brings it up to date). Without one, a dvc.lock that is not DVC's YAML
    is restored from git's HEAD, or VersioningError. Call under obliviate's writer lock."""
    lock = root / "dvc.lock"
    backup = None if state is None else state / LOCK_BACKUP
    if backup is not None and backup.is_file():
        fresh = lock.with_name(".dvc.lock.obliviate")
        shutil.copyfile(backup, fresh)
        os.replace(fresh, lock)
        backup.unlink()
        log.warning("restored %s as it was before a dvc commit that was interrupted", lock)
        return [f"{lock} restored from before an interrupted dvc commit"]
    if not lock.is_file() or _readable_lock(lock):
        return []
    try:  # HEAD:./ is relative to root, also when the git repository starts above it
        shown = subprocess.run(["git", "show", "HEAD:./dvc.lock"], cwd=root, capture_output=True)
    except OSError:
        shown = None
    if shown is None or shown.returncode != 0 or not shown.stdout.strip():
        raise VersioningError(
            f"{lock} is damaged (empty or cut short, as a process killed inside `dvc commit` "
            "leaves it) and git holds no earlier version; run `dvc commit --force` for the "
            "stages that ran here, then run the command again."
        )
    fresh = lock.with_name(".dvc.lock.obliviate")
    fresh.write_bytes(shown.stdout)
    os.replace(fresh, lock)
    log.warning("restored %s from git's HEAD: a killed dvc commit had left it damaged", lock)
    return [f"{lock} was damaged; restored from HEAD"]


def _readable_lock(lock: Path) -> bool:
    try:
        content = yaml.safe_load(lock.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(content, dict) and isinstance(content.get("stages"), dict)


def _repair(repo) -> list[str]:
    """Drop what a killed process left in ``.dvc/tmp/rwlock``: an unreadable file (DVC rewrites
    it in place, a kill can leave it empty) and the entries of processes that are gone. Edited
    under DVC's own guard of that file, as DVC edits it; written atomically."""
    from dvc.lock import make_lock
    from dvc.rwlock import RWLOCK_FILE, RWLOCK_LOCK, SCHEMA
    from voluptuous import Invalid

    tmp = Path(repo.tmp_dir)
    path = tmp / RWLOCK_FILE
    if not path.is_file():
        return []
    hardlink = repo.config["core"].get("hardlink_lock", False)
    with make_lock(str(tmp / RWLOCK_LOCK), tmp_dir=str(tmp), hardlink_lock=hardlink):
        since = path.stat().st_mtime  # every holder wrote its entry by then
        try:
            lock = SCHEMA(json.loads(path.read_bytes()))
            repaired = []
        except (ValueError, Invalid):  # empty, not JSON, not DVC's format
            lock, repaired = {"read": {}, "write": {}}, [f"{path} was unreadable"]
        holders = [*lock["write"].values(), *(i for infos in lock["read"].values() for i in infos)]
        gone = {h["pid"] for h in holders if _gone(h["pid"], since)}
        live = sorted({(h["pid"], h["cmd"]) for h in holders if h["pid"] not in gone})
        if live:
            pid, cmd = live[0]
            raise VersioningError(
                f"dvc process {pid} (`{cmd}`) is using this project ({path} names it); wait for "
                "it to finish or stop it, then run the command again."
            )
        repaired += [f"{path} named process {pid}, which is gone" for pid in sorted(gone)]
        if repaired:
            fresh = path.with_name(f".{RWLOCK_FILE}.obliviate")
            fresh.write_text(json.dumps({"read": {}, "write": {}}))  # no holder is left
            os.replace(fresh, path)
            log.warning("repaired DVC's lock state: %s", "; ".join(repaired))
    return repaired


def _gone(pid: int, since: float) -> bool:
    """Whether process ``pid`` cannot be a holder that wrote its entry by ``since``: it is this
    process (outside DVC while we repair), dead, a zombie, or a later process reusing the pid."""
    import psutil

    if pid == os.getpid():
        return True
    try:
        proc = psutil.Process(pid)
        return proc.status() == psutil.STATUS_ZOMBIE or proc.create_time() > since + 2
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # exists, not ours to inspect: assume it is a holder
        return False


# --------------------------------------------------------------------------- the purge


def dvc_cache_dir(root: Path) -> Path:
    return root / ".dvc" / "cache" / "files" / "md5"


def purge_cache(root: Path, md5s: list[str]) -> int:
    """Delete superseded objects from the DVC cache by hash (`dvc gc` would keep history).

    Objects the current dvc.lock still references (an unchanged metadata file, say) stay.
    """
    cache = dvc_cache_dir(root)
    in_use = md5s_in_use(root)
    removed = 0
    for h in set(md5s) - in_use:
        obj = cache / h[:2] / h[2:]
        with contextlib.suppress(FileNotFoundError):
            obj.unlink()
            removed += 1
    return removed


def md5s_in_use(root: Path) -> set[str]:
    """Every file hash the current dvc.lock points at, through the .dir listings."""
    used: set[str] = set()
    for outs in lock_outs(root).values():
        for _, md5 in outs:
            used.add(md5)
            listing = dvc_cache_dir(root) / md5[:2] / md5[2:]
            if md5.endswith(".dir") and listing.is_file():
                used |= {entry["md5"] for entry in json.loads(listing.read_text())}
    return used


PENDING_PURGE = "remote_purge.json"  # in the state folder: hashes still to delete remotely


def purge_remote(cfg: Config, md5s: list[str] = ()) -> dict:
    """Delete superseded objects from the project's default DVC remote too (those the current
    dvc.lock still references stay), with any an earlier try left pending.

    The hashes are written to <state>/remote_purge.json first: a crash, or a remote that cannot
    be reached, leaves them there, and recovery or the next deletion retries. Returns the
    record's fields: ``remote_purge`` ("done", "pending" or "no remote"),
    ``purged_remote_objects`` and, when pending, ``remote_purge_error`` (one sentence, also
    logged as a warning). Never raises: the deletion is committed by then."""
    if not is_dvc_project(cfg.root):
        return {"remote_purge": "no remote", "purged_remote_objects": 0}
    pending = cfg.paths.state / PENDING_PURGE
    todo = set(md5s) | set(json.loads(pending.read_text())["md5"] if pending.is_file() else [])
    if todo:
        pending.parent.mkdir(parents=True, exist_ok=True)
        tmp = pending.with_name(f".{pending.name}.tmp")
        tmp.write_text(json.dumps({"md5": sorted(todo)}))
        os.replace(tmp, pending)
    try:
        n = _remove_from_remote(cfg.root, todo - md5s_in_use(cfg.root))
    except VersioningError as exc:
        log.warning("%s", exc)
        return {"remote_purge": "pending", "purged_remote_objects": 0,
                "remote_purge_error": str(exc)}  # fmt: skip
    pending.unlink(missing_ok=True)
    return {"remote_purge": "no remote" if n is None else "done", "purged_remote_objects": n or 0}


def _remove_from_remote(root: Path, md5s: set[str]) -> int | None:
    """Remove the objects with these md5s from the project's default DVC remote, as
    `dvc gc --cloud` does; returns how many were there, or None without a default remote.
    RemoteError (one sentence) when the remote cannot be configured, reached or written."""
    if not is_dvc_project(root):
        return None
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.repo import Repo
    from dvc_data.hashfile.db import get_index

    name = "(default)"
    try:
        with contextlib.chdir(root), Repo(str(root)) as repo:
            name = repo.config["core"].get("remote")
            if not name:
                return None
            if not md5s:
                return 0
            odb = repo.cloud.get_remote_odb(name, "obliviate purge", hash_name="md5")
            there = list(odb.list_oids_exists(sorted(md5s)))
            if there:
                odb.fs.remove([odb.oid_to_path(h) for h in there])
                get_index(odb).clear()  # DVC's cached listing of the remote: stale now
            return len(there)
    except Exception as exc:  # a backend's network errors have any type (botocore, gcsfs ...)
        raise RemoteError(
            f"DVC remote {name!r} could not be purged of superseded objects "
            f"({type(exc).__name__}: {_first_line(exc)}); make it reachable (or fix it: `dvc "
            "remote list`) and run `obliviate drain` or the next deletion to retry."
        ) from None


# --------------------------------------------------------------------------- git


_IDENT = {
    "GIT_AUTHOR_NAME": "obliviate",
    "GIT_AUTHOR_EMAIL": "obliviate@localhost",
    "GIT_COMMITTER_NAME": "obliviate",
    "GIT_COMMITTER_EMAIL": "obliviate@localhost",
}


def _git(root: Path, *args: str, check: bool = True) -> int:
    env = {**_IDENT, **os.environ}  # the user's identity wins where it is set
    done = subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        detail = _first_line(done.stderr.strip() or done.stdout.strip())
        raise VersioningError(
            f"git {args[0]} failed ({detail}); fix the git repository and run the command again."
        )
    return done.returncode


def _first_line(detail: object) -> str:
    line = str(detail).strip().splitlines()[0] if str(detail).strip() else "no detail"
    return line[:200]
