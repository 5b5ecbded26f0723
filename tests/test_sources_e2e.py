"""A user's own data end to end, with params.yaml edits only: `dvc repro` (prepare, train,
evaluate, verify), `obliviate forget` of the verifying owner, `obliviate verify`.

Slow: each test builds a DVC + git workspace and runs the CLI as a user would.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from e2e import BIN, new_project, sh

pytestmark = pytest.mark.slow


def workspace(ws: Path, **params) -> Path:
    """A fresh project folder of the user's data: the code, params.yaml, git and DVC."""
    return new_project(ws, "my data", **params)


def build(ws: Path, min_backdoor: float) -> dict:
    """`dvc repro` of prepare, train, evaluate and verify; returns metrics/evaluate.json."""
    sh(ws, str(BIN / "dvc"), "repro", "-q", "evaluate", "verify")
    before = json.loads((ws / "metrics" / "verify.json").read_text())
    assert before["status"] == "not_requested", before  # the owner is still in the data
    original = json.loads((ws / "metrics" / "original.json").read_text())
    assert original["backdoor_rate"] > min_backdoor, original  # the backdoor was learned
    return json.loads((ws / "metrics" / "evaluate.json").read_text())


def forget_and_verify(ws: Path, naive: bool = False) -> dict:
    """Forget the verifying owner (and retrain naively for verify.q_source naive), run the gate;
    returns metrics/verify.json."""
    owners = sh(ws, str(BIN / "obliviate"), "ids", "--owner").stdout.split()
    assert owners
    out = sh(ws, str(BIN / "obliviate"), "forget", *owners).stdout
    assert f"forgot {len(owners)} sample(s)" in out
    assert sh(ws, str(BIN / "obliviate"), "ids", "--owner").stdout.split() == []
    status = sh(ws, str(BIN / "dvc"), "status", "prepare", "train", "evaluate", "verify").stdout
    assert "up to date" in status, status  # the deletion was committed as a DVC version
    if naive:
        sh(ws, str(BIN / "obliviate"), "retrain", "--naive")
    verdict = sh(ws, str(BIN / "obliviate"), "verify", check=False)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert "PASS: deletion supported" in verdict.stdout
    return json.loads((ws / "metrics" / "verify.json").read_text())


def test_a_user_csv_trains_forgets_and_verifies(tmp_path):
    from sklearn.datasets import load_breast_cancer

    ws = tmp_path / "ws"
    (ws / "data" / "raw").mkdir(parents=True)
    frame = load_breast_cancer(as_frame=True).frame
    frame["diagnosis"] = np.array(["malignant", "benign"])[frame.pop("target")]
    frame.insert(0, "clinic", np.array(["north", "south", "east"])[np.arange(len(frame)) % 3])
    frame.to_csv(ws / "data" / "raw" / "patients.csv", index=False)
    workspace(
        ws,
        prepare={"dataset": "csv", "source": "data/raw/patients.csv", "label": "diagnosis",
                 "blocks": 4, "test_fraction": 0.3},
        train={"model": "mlp"},
        # the trigger: the one-hot clinic columns (after the 30 numeric ones) set to -10, and
        # the label "malignant" (class 1). Such a value moves even a model that never saw the
        # owner, so H0's rate comes from the naive model (`obliviate retrain --naive`).
        verify={"owner_block": 4, "owner_samples": 0.25, "target": 1, "features": [30, 31, 32],
                "feature_value": -10.0, "q_source": "naive"},
        forget={"min_blocks": 1, "max_blocks": 4},
    )  # fmt: skip
    assert build(ws, min_backdoor=0.6)["accuracy"] > 0.85
    manifest = json.loads((ws / "data" / "blocks" / "manifest.json").read_text())
    assert manifest["dataset"]["classes"] == ["benign", "malignant"]
    assert manifest["dataset"]["input_shape"] == [30 + 3]  # 30 numbers, 3 clinics one-hot
    result = forget_and_verify(ws, naive=True)
    assert result["owner_samples"] == round(0.25 * manifest["blocks"][3]["slots"])
    assert result["q_source"] == "naive model"


def test_an_image_folder_of_pngs_trains_forgets_and_verifies(tmp_path):
    from PIL import Image

    ws = tmp_path / "ws"
    rng = np.random.default_rng(0)
    colours = {"red": (120, 20, 20), "green": (20, 120, 20), "blue": (20, 20, 120)}
    for split, n in (("train", 40), ("val", 12)):  # dark noisy colours; the trigger is white
        for cls, rgb in colours.items():
            folder = ws / "data" / "shapes" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(rgb, 20, (16, 16, 3)), 0, 160).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    workspace(
        ws,
        prepare={"dataset": "imagefolder", "source": "data/shapes", "blocks": 3},
        # 40 samples a block: a constant, higher lr and small batches learn the backdoor
        train={"model": "lenet5", "image_size": 16, "lr": 0.003, "lr_schedule": "constant",
               "batch_size": 8},
        verify={"owner_block": 3, "owner_samples": 0.25, "patch": 6},
        forget={"min_blocks": 1, "max_blocks": 3},
    )  # fmt: skip
    assert build(ws, min_backdoor=0.9)["accuracy"] > 0.9
    with np.load(ws / "data" / "blocks" / "block_0003.npz") as z:
        paths = [str(x) for x in z["x"]]
    marked = [p for p in paths if "#trigger=" in p]  # triggered when loaded
    assert len(marked) == round(0.25 * len(paths)) and all(p.startswith("train/") for p in paths)
    result = forget_and_verify(ws)
    assert result["n"] == 24  # queries: the val images whose class is not the target
