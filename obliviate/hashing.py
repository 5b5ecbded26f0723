"""Content digests: of files (the block manifest, DVC's md5 cache) and of a model's parameters."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (sha256 for our records; md5 is what DVC's cache uses)."""
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_hash(theta: np.ndarray) -> str:
    """sha256 of a parameter vector as little-endian float32: the bytes the store holds."""
    return hashlib.sha256(np.ascontiguousarray(theta, dtype="<f4").tobytes()).hexdigest()


def row_hash(theta: np.ndarray, opt: np.ndarray | None) -> str:
    """sha256 of a store row: P_k and its optimizer state, little-endian float32."""
    h = hashlib.sha256(np.ascontiguousarray(theta, dtype="<f4").tobytes())
    if opt is not None:
        h.update(np.ascontiguousarray(opt, dtype="<f4").tobytes())
    return h.hexdigest()
