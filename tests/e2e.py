"""Shared by the end-to-end deletion tests: a real DVC + git workspace, built once per session.

Test modules load it with ``pytest_plugins = ["e2e"]``, so the session-scoped ``template`` is one
fixture (built once) however many modules use it; the helpers are imported by name, so
pytest cannot rewrite this module's asserts (PYTEST_DONT_REWRITE says so, without a warning).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FORGET, copy_project, write_params

BIN = Path(sys.executable).parent


def env_for(ws: Path, **extra) -> dict:
    env = {
        **os.environ,
        "PREFECT_HOME": str(ws / ".prefect"),
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("PREFECT_API_URL", None)
    return {**env, **extra}


def sh(ws: Path, *cmd, check=True, **extra) -> subprocess.CompletedProcess:
    done = subprocess.run(
        cmd, cwd=ws, env=env_for(ws, **extra), capture_output=True, text=True, timeout=900
    )
    if check:
        assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done


def new_project(ws: Path, message: str = "baseline", **params) -> Path:
    """A fresh project folder committed to git: the code dvc.yaml depends on, params.yaml with
    ``params`` replaced, an initialised DVC."""
    copy_project(ws)
    write_params(ws, **params)
    (ws / ".gitignore").write_text(
        "/data/blocks\n/data/test.npz\n/models/\n/metrics\n/reports\n/.obliviate/\n/.prefect/\n"
    )
    sh(ws, "git", "init", "-q")
    sh(ws, str(BIN / "dvc"), "init", "-q")
    sh(ws, "git", "add", "-A")
    sh(ws, "git", "commit", "-qm", message)
    return ws


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """A digits project (FORGET params) after `dvc repro`, committed to git. Copy it, never
    change it."""
    ws = new_project(tmp_path_factory.mktemp("template"), **FORGET)
    sh(ws, str(BIN / "dvc"), "repro", "-q")
    sh(ws, "git", "add", "-A")
    sh(ws, "git", "commit", "-qm", "after dvc repro")
    return ws


def unique_sample(ws: Path, block: int = 4) -> tuple[str, bytes]:
    """A sample of `block` whose pixel bytes occur in no other sample (digits has duplicates)."""
    blocks = sorted((ws / "data" / "blocks").glob("block_*.npz"))
    all_x = [np.load(b)["x"] for b in blocks]
    seen: dict[bytes, int] = {}
    for xs in all_x:
        for x in xs:
            seen[x.tobytes()] = seen.get(x.tobytes(), 0) + 1
    with np.load(blocks[block - 1]) as z:
        for sid, x in zip(z["ids"], z["x"], strict=True):
            if seen[x.tobytes()] == 1:
                return str(sid), x.tobytes()
    raise AssertionError("no unique sample")


def files_containing(ws: Path, needle: bytes) -> list[Path]:
    return [
        p for p in ws.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()
    ]


def encodings_of(sid: str) -> list[bytes]:
    """Every form a sample id takes in a workspace: numpy's UTF-32 (blocks, index), UTF-8 in JSON
    strings and SQLite, quoted or not, and JSON's ASCII escapes of non-ASCII text."""
    forms = {sid.encode("utf-32-le"), sid.encode(), f'"{sid}"'.encode(), f"'{sid}'".encode()}
    forms.add(json.dumps(sid).encode())  # "Zo\u00eb" where the id is not ASCII
    return sorted(forms)


def assert_nowhere(ws: Path, sid: str) -> None:
    """``sid`` is in no file of the workspace (the working tree, .dvc/cache, Prefect's database
    when PREFECT_HOME is inside it) and in no object of git's history (decompressed)."""
    history = subprocess.run(["git", "cat-file", "--batch-all-objects", "--batch"], cwd=ws,
                             capture_output=True, check=True).stdout  # fmt: skip
    for encoded in encodings_of(sid):
        assert files_containing(ws, encoded) == [], encoded
        assert encoded not in history, encoded


def dvc_status(ws: Path) -> str:
    return sh(ws, str(BIN / "dvc"), "status").stdout.strip()


def final_state(ws: Path, dvc=dvc_status) -> dict:
    """What a deletion leaves: store rows, sample ids, audited models, staging, the requests
    and `dvc status` (``dvc``: how to get it)."""
    from obliviate import lifecycle
    from obliviate.audit import read_records
    from obliviate.config import load_config
    from obliviate.requests import SampleIndex
    from obliviate.store import ParamStore

    cfg = load_config(ws / "params.yaml")
    store = ParamStore.open(cfg.paths.store)
    records = read_records(cfg.paths.audit)
    return {
        "rows": np.stack([store.read(k)[0] for k in range(store.n_blocks + 1)]),
        "ids": sorted(SampleIndex.of(cfg.paths.blocks).ids),
        "models": [r["model_after"] for r in records],
        "staging": sorted(p.name for p in (cfg.paths.state / "staging").glob("*")),
        "requests": sorted(e["status"] for e in lifecycle.entries(cfg)),  # finished once
        "dvc": dvc(ws),
    }
