"""Store locations on object storage: ``paths.store: s3://bucket/prefix/store.zarr``.

A location is a local ``Path`` or a ``StoreURL``: the URL kept as a string, with the few pathlib
operations the pipeline applies to ``paths.store`` (``/``, ``name``, ``exists``, ``is_file``).
I/O goes through fsspec (s3fs for ``s3://``), imported on first use. The endpoint and the
credentials come from the environment the backend reads (``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` ...),
so none of them is written in params.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")  # two letters at least: never a drive letter


def is_url(value: object) -> bool:
    return isinstance(value, str) and _URL.match(value) is not None


class StoreURL(str):
    """A location on object storage, e.g. ``s3://bucket/models/store.zarr``."""

    def __truediv__(self, part: str) -> StoreURL:
        return StoreURL(f"{self.rstrip('/')}/{part}")

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    def exists(self) -> bool:
        fs, path = filesystem(self)
        return fs.exists(path)

    def is_file(self) -> bool:
        fs, path = filesystem(self)
        return fs.isfile(path)


Location = Path | StoreURL


def as_location(value: str | Path) -> Location:
    """A URL as a StoreURL, anything else as a Path (unchanged when it is one)."""
    if isinstance(value, Path | StoreURL):
        return value
    return StoreURL(value) if is_url(value) else Path(value)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL, with no cached listing: a writer process
    changes the same store while this one reads it."""
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)
    return fs, path


def require_local(location: Location) -> None:
    """Deletions stage, hash and DVC-version the store's files: they need a local folder."""
    from obliviate.errors import StoreError

    if isinstance(location, StoreURL):
        raise StoreError(
            f"{location} is on object storage, but deletions need a local store (they hash and "
            "DVC-version its files); copy it to a local folder, point paths.store at it and run "
            "the deletion again."
        )


def stored_bytes(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.du(path, total=True)) if fs.exists(path) else 0
