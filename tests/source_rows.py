"""Real-world sources as a new user brings them, one row per shape, each through the path users
run: `dvc repro` (through evaluate: these rows plant no verifying owner), then
`obliviate forget <id>`, `audit` and `export`; a bad file ends `dvc repro`
in one sentence at the prepare stage. The rows run in tests/test_sources_tables.py (CSV,
Parquet) and tests/test_sources_arrays.py (npz, image folders), two modules so that pytest-xdist
spreads them over its workers.

- csv-text-ids: a `;`-separated CSV with a BOM, every field quoted (some hold `;` or `,`): ids of
  any text (UUIDs, e-mails, non-ASCII with spaces), a categorical column, a text label;
- csv-numeric-ids: a numeric id column, forgotten through a JSON-lines file naming the number;
- csv-missing-value: one empty feature value, one sentence naming the column and row;
- parquet-nullable: categorical, nullable Int64 / Float64 / boolean and string dtypes, and a
  categorical label;
- npz-int-labels: uint8 images, integer labels and integer ids;
- npz-text-labels: float features, string labels and string ids;
- images-mixed: an image folder of PNG and JPEG in L, RGB and RGBA, at their own 12x12 size;
- images-corrupt: the same with one file that is not an image, named.

Each row builds a DVC + git workspace and runs the CLI as a user would (about a minute).
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
from e2e import BIN, assert_nowhere, new_project, sh

N = 120  # samples per source: 3 blocks of about 30 after the test and validation splits
FAST = {"epochs": 3, "lr": 0.01, "lr_schedule": "constant", "batch_size": 8}
SMALL = {"blocks": 3, "test_fraction": 0.25}
NO_OWNER = {"owner_block": 0}  # the backdoor gate has its own end-to-end tests
FORGET = {"min_blocks": 1, "max_blocks": 3}


def labels(n: int = N) -> np.ndarray:
    return np.arange(n) % 2


def features(n: int = N, width: int = 3) -> np.ndarray:
    """Two well separated classes: a model that learns anything beats the majority class."""
    rng = np.random.default_rng(0)
    return (rng.normal(0, 1, (n, width)) + 3 * labels(n)[:, None]).round(4)


def text_ids(n: int = N) -> list[str]:
    kinds = [
        lambda i: str(uuid.UUID(int=i + 1)),
        lambda i: f"zoë.nørd+{i}@example.org",
        lambda i: f"Zoë Nørd {i:03d}",  # non-ASCII, with spaces
    ]
    return [kinds[i % 3](i) for i in range(n)]


def csv_text_ids(raw: Path) -> dict:
    x = features()
    frame = pd.DataFrame({
        "customer id": text_ids(),
        "spend; EUR": x[:, 0],
        "visits": x[:, 1],
        "city": np.array(["Köln", "Saint-Denis, Réunion", "Zürich; Altstadt"])[np.arange(N) % 3],
        "outcome": np.array(["no", "yes, bought"])[labels()],
    })  # fmt: skip
    path = raw / "customers.csv"
    text = frame.to_csv(sep=";", index=False, quoting=1)  # csv.QUOTE_ALL
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # a byte-order mark, as Excel writes
    return {"dataset": "csv", "source": str(path), "label": "outcome", "id": "customer id",
            "sep": ";"}  # fmt: skip


def csv_numeric_ids(raw: Path) -> dict:
    frame = pd.DataFrame(features(), columns=["a", "b", "c"])
    frame.insert(0, "patient", 1000 + np.arange(N))
    frame["label"] = labels()
    frame.to_csv(raw / "patients.csv", index=False)
    return {"dataset": "csv", "source": str(raw / "patients.csv"), "id": "patient"}


def csv_missing_value(raw: Path) -> dict:
    frame = pd.DataFrame(features(), columns=["a", "b", "c"])
    frame["label"] = labels()
    frame.loc[7, "b"] = None
    frame.to_csv(raw / "gaps.csv", index=False)
    return {"dataset": "csv", "source": str(raw / "gaps.csv")}


def parquet_nullable(raw: Path) -> dict:
    x = features()
    frame = pd.DataFrame({
        "id": pd.array(text_ids(), dtype="string"),
        "score": pd.array(x[:, 0], dtype="Float64"),
        "count": pd.array(np.round(x[:, 1] * 10).astype(int), dtype="Int64"),
        "member": pd.array(labels() == 1, dtype="boolean"),
        "plan": pd.Categorical(np.array(["basic", "plus", "pro"])[np.arange(N) % 3]),
        "label": pd.Categorical(np.array(["stays", "churns"])[labels()]),
    })  # fmt: skip
    frame.to_parquet(raw / "churn.parquet", engine="pyarrow")
    return {"dataset": "parquet", "source": str(raw / "churn.parquet"), "id": "id"}


def npz_int_labels(raw: Path) -> dict:
    rng = np.random.default_rng(0)
    y = labels()
    x = (rng.integers(0, 60, (N, 1, 8, 8)) + 150 * y[:, None, None, None]).astype(np.uint8)
    np.savez(raw / "scans.npz", x=x, y=y, ids=70000 + np.arange(N))
    return {"dataset": "npz", "source": str(raw / "scans.npz")}


def npz_text_labels(raw: Path) -> dict:
    y = np.array(["benign", "malignant"])[labels()]
    np.savez(raw / "cells.npz", x=features().astype(np.float32), y=y, ids=np.array(text_ids()))
    return {"dataset": "npz", "source": str(raw / "cells.npz")}


def image_folder(raw: Path, corrupt: bool = False) -> dict:
    """Two classes of 12x12 images, dark and light, as PNG and JPEG in L, RGB and RGBA."""
    from PIL import Image

    rng = np.random.default_rng(0)
    modes = ["L", "RGB", "RGBA"]
    for split, n in (("train", 48), ("val", 12)):
        for c, cls in enumerate(("dark", "light")):
            folder = raw / "photos" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                level = rng.integers(20, 80) + 150 * c
                pixels = np.clip(rng.normal(level, 10, (12, 12, 4)), 0, 255).astype(np.uint8)
                mode = modes[i % 3]
                pixels = pixels[..., 0] if mode == "L" else pixels[..., : len(mode)]
                pixels[..., -1] = 255 if mode == "RGBA" else pixels[..., -1]
                ext = "jpg" if i % 2 and mode != "RGBA" else "png"
                Image.fromarray(pixels, mode).save(folder / f"{cls}-{i:02d}.{ext}")
    if corrupt:
        (raw / "photos" / "train" / "light" / "light-05.png").write_bytes(b"\x89PNG\r\n garbage")
    return {"dataset": "imagefolder", "source": str(raw / "photos")}


# row: (make the file -> prepare settings, model, None or the one sentence `dvc repro` ends in)
ROWS = {
    "csv-text-ids": (csv_text_ids, "mlp", None),
    "csv-numeric-ids": (csv_numeric_ids, "mlp", None),
    "csv-missing-value": (
        csv_missing_value, "mlp", r"'b' has 1 missing value\(s\) \(first at row 8\)",
    ),
    "parquet-nullable": (parquet_nullable, "mlp", None),
    "npz-int-labels": (npz_int_labels, "lenet5", None),
    "npz-text-labels": (npz_text_labels, "mlp", None),
    "images-mixed": (image_folder, "lenet5", None),
    "images-corrupt": (
        lambda raw: image_folder(raw, corrupt=True), "lenet5",
        r"photos/train/light/light-05.png cannot be read as an image",
    ),
}  # fmt: skip


def run_row(tmp_path: Path, row: str) -> None:
    """Build the row's file and project, `dvc repro`, forget an id, audit and export."""
    make, model, refusal = ROWS[row]
    raw = tmp_path / "raw"  # the user's own files, outside the project (theirs to keep)
    raw.mkdir()
    prepare = {**SMALL, **make(raw)}
    ws = tmp_path / "ws"
    ws.mkdir()
    new_project(ws, "my data", prepare=prepare, train={"model": model, **FAST},
                verify=NO_OWNER, forget=FORGET)  # fmt: skip
    built = sh(ws, str(BIN / "dvc"), "repro", "evaluate", check=False)  # (no owner to verify)
    if refusal is not None:
        ours = [line for line in built.stderr.splitlines() if line.startswith("error: ")]
        assert built.returncode != 0 and len(ours) == 1, built.stdout + built.stderr
        assert re.search(refusal, ours[0]) and ours[0].endswith("."), ours
        assert "Traceback" not in built.stderr and not (ws / "data" / "blocks").exists()
        return
    assert built.returncode == 0, built.stdout + built.stderr
    metrics = json.loads((ws / "metrics" / "evaluate.json").read_text())
    assert metrics["accuracy"] > metrics["majority_rate"] + 0.2, metrics  # it learned the data
    assert "warning:" not in built.stderr
    sh(ws, "git", "add", "-A")
    sh(ws, "git", "commit", "-qm", "after dvc repro")

    listed = sh(ws, str(BIN / "obliviate"), "ids", "--block", "2").stdout.splitlines()
    sid = max(listed, key=lambda i: (not i.isascii(), " " in i, i))  # the most awkward id
    if row == "csv-numeric-ids":  # a numeric id, as a JSON number in a request file
        (tmp_path / "request.jsonl").write_text(f"{int(sid)}\n")
        forgot = sh(ws, str(BIN / "obliviate"), "forget", "--file", str(tmp_path / "request.jsonl"))
    else:
        forgot = sh(ws, str(BIN / "obliviate"), "forget", sid)
    assert "forgot 1 sample(s)" in forgot.stdout
    gone = [sid]
    if row == "csv-text-ids":  # the queued path (the inbox) takes the same ids
        queued = max(set(listed) - {sid}, key=lambda i: (not i.isascii(), " " in i, i))
        sh(ws, str(BIN / "obliviate"), "request", queued)
        drained = sh(ws, str(BIN / "obliviate"), "drain")
        assert "1 request(s) done" in drained.stdout
        gone.append(queued)
    listing = sh(ws, str(BIN / "obliviate"), "ids", "--block", "2").stdout.splitlines()
    assert not set(gone) & set(listing) and len(listing) == len(listed) - len(gone)
    audit = sh(ws, str(BIN / "obliviate"), "audit", "--json").stdout.splitlines()
    assert len(audit) == len(gone)
    assert all(len(json.loads(line)["sample_id_hashes"]) == 1 for line in audit)
    out = tmp_path / "export" / "model.safetensors"
    out.parent.mkdir()
    sh(ws, str(BIN / "obliviate"), "export", "-o", str(out))
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["served"] and sidecar["dataset"]["n_classes"] == 2
    assert sh(ws, "git", "status", "--porcelain").stdout.strip() == ""
    assert list((ws / ".prefect").glob("*.db"))  # Prefect's database is in the workspace
    for forgotten in gone:
        if not forgotten.isdigit():  # a digit string also occurs in hashes, sizes, timestamps
            assert_nowhere(ws, forgotten)  # the workspace, .dvc/cache, git, Prefect's database
