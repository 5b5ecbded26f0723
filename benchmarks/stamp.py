"""Benchmarks write their tables into the docs themselves, stamped with what they measured.

A table lives between two markers in a markdown file:

    <!-- bench:NAME -->  ...written by the script...  <!-- /bench:NAME -->

``write`` replaces what is between them with the new table and a line naming the command, the
commit and the params.yaml digest it was measured at, so a table cannot silently go stale.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """The commit measured: HEAD now (+ a note when obliviate/ or params.yaml differ from it), or
    OBLIVIATE_BENCH_COMMIT, which `make bench` sets when it starts so that a long run names the
    commit it started from."""
    if os.environ.get("OBLIVIATE_BENCH_COMMIT"):
        return os.environ["OBLIVIATE_BENCH_COMMIT"]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "obliviate", "params.yaml")
    return head + ("+uncommitted changes" if dirty else "")


def params_digest() -> str:
    return hashlib.sha256((ROOT / "params.yaml").read_bytes()).hexdigest()[:12]


def stamp(command: str, measured: dict | None = None) -> str:
    """The stamp line; ``measured``: a result's own ``commit`` and ``params_sha256`` (a table
    rewritten from its JSON names what it was measured at, not what is checked out now)."""
    measured = measured or {}
    return (
        f"_Written by `{command}` on {time.strftime('%Y-%m-%d')} at commit "
        f"{measured.get('commit') or commit()}, "
        f"params.yaml sha256 {measured.get('params_sha256') or params_digest()}._"
    )


def write(doc: Path, name: str, body: str, command: str, measured: dict | None = None) -> None:
    """Replace the table ``name`` in ``doc`` (markers must exist) with ``body`` and a stamp."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = doc.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} has no {begin} ... {end} markers; add them where the table goes.")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{stamp(command, measured)}\n\n{body.strip()}\n{end}{tail}")
