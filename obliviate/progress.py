"""Progress bars for long work (rich), shown only on an interactive terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def block_progress(
    description: str, total: int, done: int = 0
) -> Iterator[Callable[[int, int], None]]:
    """Yield a callback ``(k, n_blocks)`` that advances a bar to block k."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(description, total=total, completed=done)
        yield lambda k, n: bar.update(task, completed=k)
