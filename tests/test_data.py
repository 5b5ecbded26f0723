"""Loaders on tiny files the tests write themselves."""

import gzip
import pickle

import numpy as np
import pytest
from conftest import ROOT

from obliviate.config import load_config
from obliviate.data import PURCHASE_COLUMNS, load_dataset, read_idx
from obliviate.errors import DataError


def prep(tmp_path, **prepare):
    return load_config(ROOT / "params.yaml", prepare=prepare).prepare


def write_idx(path, arr, gz=False):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def make_idx_dir(folder, n_train=20, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte{sfx}", rng.integers(0, 255, (n, 28, 28)), gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{sfx}", np.arange(n) % 10, gz)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader_gives_stable_ids(tmp_path, gz):
    make_idx_dir(tmp_path, gz=gz)
    ds = load_dataset(prep(tmp_path, dataset="fashion-mnist", source=str(tmp_path)), tmp_path)
    assert ds.train.x.shape == (20, 1, 28, 28) and ds.test.x.shape == (10, 1, 28, 28)
    assert ds.train.ids[12] == "fashion-mnist:train:12" and ds.test.ids[3] == "fashion-mnist:test:3"
    assert ds.info.input_shape == (1, 28, 28) and ds.info.n_classes == 10
    assert np.array_equal(ds.train.y, np.arange(20) % 10)


def test_corrupt_and_missing_idx_files_are_named(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    img = tmp_path / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-5])  # truncated
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(img)
    img.unlink()
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\(\.gz\) is missing"):
        load_dataset(prep(tmp_path, dataset="mnist", source=str(tmp_path)), tmp_path)


def write_purchase(path, n=40, header=PURCHASE_COLUMNS):
    rows = [",".join(header)]
    for i in range(n):
        label = "TRUE" if i % 4 == 0 else "FALSE"
        vals = [
            str(i % 5),
            "1.5",
            "0",
            "0",
            str(i),
            "12.0",
            "0.01",
            "0.02",
            "0",
            "0",
            "Nov",
            "1",
            "2",
            "3",
            "4",
            "Returning_Visitor",
            "FALSE",
            label,
        ]
        rows.append(",".join(vals))
    path.write_text("\n".join(rows) + "\n")


def test_purchase_loader(tmp_path):
    csv = tmp_path / "shop.csv"
    write_purchase(csv)
    ds = load_dataset(
        prep(tmp_path, dataset="purchase", source=str(csv), test_fraction=0.25), tmp_path
    )
    assert len(ds.train) == 30 and len(ds.test) == 10
    assert ds.train.x.shape == (30, 17) and ds.train.x.dtype == np.float32
    assert set(ds.train.ids) | set(ds.test.ids) == {f"purchase:{i}" for i in range(40)}
    assert ds.info.n_classes == 2


def test_purchase_bad_header_and_row(tmp_path):
    csv = tmp_path / "shop.csv"
    write_purchase(csv, header=["a"] * 18)
    with pytest.raises(DataError, match="header"):
        load_dataset(prep(tmp_path, dataset="purchase", source=str(csv)), tmp_path)
    write_purchase(csv)
    csv.write_text(csv.read_text().replace("Nov", "Nowember", 1))
    with pytest.raises(DataError, match="malformed row"):
        load_dataset(prep(tmp_path, dataset="purchase", source=str(csv)), tmp_path)


def test_purchase_real_file_when_available(tmp_path):
    real = ROOT.parent / "shared" / "data" / "purchase" / "online_shoppers_intention.csv"
    if not real.is_file():
        pytest.skip("the shared Purchase CSV is not on this machine")
    ds = load_dataset(
        prep(tmp_path, dataset="purchase", source=str(real), test_fraction=0.1), tmp_path
    )
    assert len(ds.train) + len(ds.test) == 12330 and len(ds.train) == 11097


def test_cifar10_loader(tmp_path, monkeypatch):
    from torchvision import datasets

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [str(i) for i in range(10)]})
    )
    # torchvision checks md5 sums of the real archive; these stand-ins cannot match them
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    ds = load_dataset(prep(tmp_path, dataset="cifar10", source=str(tmp_path)), tmp_path)
    assert ds.train.x.shape == (20, 3, 32, 32) and ds.test.x.shape == (4, 3, 32, 32)
    assert ds.train.ids[19] == "cifar10:train:19"


def test_svhn_loader(tmp_path, monkeypatch):
    from scipy.io import savemat
    from torchvision import datasets

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        X = rng.integers(0, 255, (32, 32, 3, n), dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": X, "y": np.arange(1, n + 1)[:, None]})
    monkeypatch.setattr(datasets.SVHN, "_check_integrity", lambda self: True)
    ds = load_dataset(prep(tmp_path, dataset="svhn", source=str(tmp_path)), tmp_path)
    assert ds.train.x.shape == (6, 3, 32, 32) and ds.test.ids[2] == "svhn:test:2"


def test_torchvision_sets_missing_root(tmp_path):
    with pytest.raises(DataError, match="is missing"):
        load_dataset(prep(tmp_path, dataset="cifar10", source=str(tmp_path / "nope")), tmp_path)


def test_imagenet_folder_keeps_paths(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset(prep(tmp_path, dataset="imagenet", source=str(tmp_path)), tmp_path, 32)
    assert ds.info.n_classes == 2 and ds.info.input_shape == (3, 32, 32)
    assert ds.train.ids[0] == "imagenet:train/n01/0.png" and ds.train.x[0] == "train/n01/0.png"

    import torch

    from obliviate.train import make_inputs

    assert list(ds.train.x[:2]) == ["train/n01/0.png", "train/n01/1.png"]
    batch = make_inputs(ds.info)(ds.train.x[:2])  # red 0 and 50 of 255, resized to 32x32
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    assert (batch[0] == 0).all() and (batch[1, 1:] == 0).all()
    assert torch.allclose(batch[1, 0], torch.full((32, 32), 50 / 255))
