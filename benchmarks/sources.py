"""Two of a user's own sources end to end, for README's data-source section: a CSV whose id column
holds text, and an image folder at its native size. Each runs as a user would, in a scratch
project: params.yaml edits only, `dvc repro`, then `obliviate forget` of one sample by its id.

    python benchmarks/sources.py      # about 3 minutes on 2 CPU cores

Writes the table between the `bench:sources` markers of README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import stamp
import yaml

ROOT = stamp.ROOT
BIN = Path(sys.executable).parent


def csv_with_text_ids(raw: Path) -> dict:
    """scikit-learn's breast-cancer table (569 patients, 30 measurements) as a CSV with a text
    label and an id column of UUIDs, the way a hospital export looks."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame["diagnosis"] = np.array(["malignant", "benign"])[frame.pop("target")]
    ids = [uuid.UUID(bytes=hashlib.sha256(b"patient %d" % i).digest()[:16], version=4)
           for i in range(len(frame))]  # fmt: skip
    frame.insert(0, "patient", [str(i) for i in ids])
    frame.to_csv(raw / "patients.csv", index=False)
    return {
        "prepare": {"dataset": "csv", "source": str(raw / "patients.csv"), "label": "diagnosis",
                    "id": "patient", "blocks": 10},
        "train": {"model": "mlp"},
    }  # fmt: skip


def folder_at_native_size(raw: Path) -> dict:
    """scikit-learn's digits (1,797 images) as 8x8 grayscale PNGs in train/<digit>/, with no
    train.image_size: the images keep their 8x8 and their one channel."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (img, y) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = raw / "digits" / "train" / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8), "L").save(folder / f"{i:04d}.png")
    return {
        "prepare": {"dataset": "imagefolder", "source": str(raw / "digits"), "blocks": 20},
        "train": {"model": "lenet5", "image_size": None},
    }


EXAMPLES = {
    "CSV, UUID ids (breast cancer)": csv_with_text_ids,
    "image folder, 8x8 PNG (digits)": folder_at_native_size,
}


def run(ws: Path, *cmd: str) -> str:
    env = {**os.environ, "PREFECT_HOME": str(ws / ".prefect"), "DVC_NO_ANALYTICS": "1",
           "PATH": f"{BIN}:{os.environ['PATH']}"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {ws}:\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def project(ws: Path, settings: dict) -> None:
    """A scratch project: dvc.yaml, the code, params.yaml with ``settings``, git and DVC."""
    for item in ("dvc.yaml", "obliviate"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, ws / item)
    (ws / "audit").mkdir()
    (ws / "audit" / "deletions.jsonl").touch()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    settings = {**settings, "verify": {"owner_block": 0}}  # the data, not the backdoor gate
    for section, values in settings.items():
        params[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(ws, "git", "init", "-q")
    run(ws, "git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "--allow-empty",
        "-m", "empty")  # fmt: skip
    run(ws, str(BIN / "dvc"), "init", "-q")


def measure(name: str, make, scratch: Path) -> dict:
    raw, ws = scratch / "raw", scratch / "ws"
    raw.mkdir()
    ws.mkdir()
    settings = make(raw)
    project(ws, settings)
    start = time.perf_counter()
    run(ws, str(BIN / "dvc"), "repro")
    built = time.perf_counter() - start
    metrics = json.loads((ws / "metrics" / "evaluate.json").read_text())
    manifest = json.loads((ws / "data" / "blocks" / "manifest.json").read_text())
    sid = run(ws, str(BIN / "obliviate"), "ids", "--block", "2", "--limit", "1").strip()
    start = time.perf_counter()
    out = run(ws, str(BIN / "obliviate"), "forget", "--", sid)
    forgot = time.perf_counter() - start
    after = json.loads((ws / "metrics" / "evaluate.json").read_text())
    assert "forgot 1 sample(s)" in out, out
    return {
        "example": name,
        "input_shape": manifest["dataset"]["input_shape"],
        "blocks": manifest["n_blocks"],
        "train_samples": manifest["n_samples"],
        "accuracy": metrics["accuracy"],
        "majority_rate": metrics["majority_rate"],
        "n_test": metrics["n_test"],
        "dvc_repro_s": built,
        "forget_s": forgot,
        "accuracy_after": after["accuracy"],
        "id_example": "UUID" if "-" in sid else "path",
        "commit": stamp.commit(),
        "params_sha256": stamp.params_digest(),
    }


def table(results: list[dict]) -> str:
    rows = [
        "| source | model input | B | test accuracy | majority-class rate | `dvc repro` | "
        "`obliviate forget <id>` | accuracy after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        shape = "x".join(map(str, r["input_shape"]))
        rows.append(
            f"| {r['example']} | {shape} | {r['blocks']} | {r['accuracy']:.4f} "
            f"(n={r['n_test']}) | {r['majority_rate']:.4f} | {r['dvc_repro_s']:.0f} s | "
            f"{r['forget_s']:.0f} s | {r['accuracy_after']:.4f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    results = []
    for name, make in EXAMPLES.items():
        with tempfile.TemporaryDirectory(prefix="obliviate-sources-") as scratch:
            results.append(measure(name, make, Path(scratch)))
            print(json.dumps(results[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sources.json").write_text(json.dumps(results, indent=1) + "\n")
    stamp.write(ROOT / "README.md", "sources", table(results), "python benchmarks/sources.py",
                results[0])  # fmt: skip


if __name__ == "__main__":
    main()
