"""Checkpoint size per block for the models obliviate builds: the storage arithmetic of
docs/scale-out.md. Writes P_0, P_1 and Adam's state after a few steps on random inputs into a
Zarr array with the store's codec and chunking, and reports stored bytes against raw.

    python benchmarks/checkpoint_size.py   # ~2 min on 2 CPU cores (resnet50 at 224x224)

Weights a few steps from init are as incompressible as trained ones (the low mantissa bits are
noise either way); the fully trained stores of docs/benchmarks.md give 0.90 (lenet5) and 0.91 (mlp).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import zarr

from obliviate.models import build_model, flatten
from obliviate.store import MAX_CHUNK_ELEMS, codec

CASES = {  # model: (input shape, classes)
    "lenet5": ((1, 28, 28), 10),
    "resnet18": ((3, 224, 224), 1000),
    "resnet50": ((3, 224, 224), 1000),
}


def measure(name: str, steps: int = 3) -> dict:
    shape, classes = CASES[name]
    torch.manual_seed(0)
    model = build_model(name, shape, classes, 128)
    p0 = flatten(model).numpy()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        x, y = torch.randn(2, *shape), torch.randint(0, classes, (2,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    p1 = flatten(model).numpy()
    state = np.concatenate([
        t.reshape(-1).numpy() for s in opt.state.values() for k, t in s.items() if k != "step"
    ])  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for label, rows in (("params", np.stack([p0, p1])), ("adam_state", state[None])):
            path = Path(tmp) / f"{label}.zarr"
            arr = zarr.create_array(str(path), shape=rows.shape, dtype="float32",
                                    chunks=(1, min(rows.shape[1], MAX_CHUNK_ELEMS)),
                                    compressors=[codec()], fill_value=0.0)  # fmt: skip
            arr[:] = rows
            stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            sizes[label] = {"raw": rows.nbytes, "stored": stored, "ratio": stored / rows.nbytes}
    return {"model": name, "parameters": int(p0.size), **sizes}


def main() -> None:
    rows = [measure(name) for name in (sys.argv[1:] or CASES)]
    print(json.dumps(rows, indent=1))
    print("| model | parameters | raw MiB per P_k | stored / raw (P) | stored / raw (Adam state) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters']:,} | {r['params']['raw'] / 2 / 2**20:.1f} "
              f"| {r['params']['ratio']:.3f} | {r['adam_state']['ratio']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
