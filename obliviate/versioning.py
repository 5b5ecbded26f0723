"""Versioning a change to the workspace: DVC (in-process, through its Python API) and one git
commit.

A deletion rewrites the outputs of some DVC stages (the blocks, the store); ``commit`` records
exactly the stages whose outputs it names, as `dvc commit --force STAGE` would, then commits
dvc.lock and the audit trail to git. DVC runs in this process: a long-running worker pays its
import once, not a subprocess per deletion. Every failure is a VersioningError (one sentence).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path

import yaml

from obliviate.config import Config
from obliviate.errors import ObliviateError
from obliviate.faults import crashpoint


class VersioningError(ObliviateError):
    """DVC or git could not record the new version."""


def stages_writing(root: Path, paths: list[Path]) -> list[str]:
    """Stages in dvc.lock (that is: that ran here) whose outputs include one of ``paths``."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return []
    wanted = {os.path.relpath(p, root) for p in paths}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return sorted(
        name
        for name, stage in stages.items()
        if wanted & {os.path.normpath(o["path"]) for o in stage.get("outs", [])}
    )


def commit(cfg: Config, paths: list[Path], message: str) -> str:
    """DVC-commit the stages that write ``paths``; git-commit dvc.lock and the audit trail.

    Returns what was versioned: "no DVC project", "dvc", "dvc+git" or "dvc+git (nothing new)"
    (a redo after the commit already happened)."""
    root = cfg.root
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return "no DVC project"
    stages = stages_writing(root, paths)
    crashpoint("before_dvc_commit")
    if stages:
        _dvc_commit(root, stages)
    if _git(root, "rev-parse", "--is-inside-work-tree", check=False) != 0:
        return "dvc"
    files = [p for p in ("dvc.lock", os.path.relpath(cfg.paths.audit, root)) if (root / p).exists()]
    _git(root, "add", "--", *files)
    if _git(root, "diff", "--cached", "--quiet", "--", *files, check=False) == 0:
        return "dvc+git (nothing new)"
    crashpoint("before_git_commit")
    _git(root, "commit", "--quiet", "-m", message, "--", *files)
    return "dvc+git"


def _dvc_commit(root: Path, stages: list[str]) -> None:
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    logging.getLogger("dvc").setLevel(logging.WARNING)  # not "Updating lock file" on our output
    try:
        # DVC resolves targets and paths against the working directory: work from the project
        with contextlib.chdir(root), Repo(str(root)) as repo:
            for stage in stages:
                repo.commit(stage, force=True)
    except DvcException as exc:
        raise VersioningError(
            f"dvc could not commit stage(s) {', '.join(stages)} ({_first_line(exc)}); "
            "fix the DVC workspace (`dvc status`) and run the command again to finish."
        ) from None


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
