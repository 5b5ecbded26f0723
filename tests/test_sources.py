"""The user's own data: csv, parquet, npz and image folders, on files each test writes itself."""

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, write_params

from obliviate.config import load_config
from obliviate.data import DatasetInfo, load_dataset
from obliviate.errors import ConfigError, DataError


def prep(**prepare):
    return load_config(ROOT / "params.yaml", prepare=prepare).prepare


def load(dataset, source, **prepare):
    return load_dataset(prep(dataset=dataset, source=str(source), **prepare), ROOT)


def table(n=60):
    """A small table: two numeric columns, a categorical one, a label and an id column."""
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "uid": [f"u{i:03d}" for i in range(n)],
        "height": rng.normal(170, 10, n).round(1),
        "weight": rng.normal(70, 5, n).round(1),
        "colour": np.array(["red", "green", "blue"])[np.arange(n) % 3],
        "label": np.array(["cat", "dog"])[np.arange(n) % 2],
    })  # fmt: skip


def one_sentence(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.endswith(".") and "Traceback" not in msg, msg
    return msg


# --------------------------------------------------------------------------- csv and parquet


def test_csv_standardises_on_train_and_one_hot_encodes(tmp_path):
    frame = table().drop(columns="uid")
    frame.to_csv(tmp_path / "people.csv", index=False)
    ds = load("csv", tmp_path / "people.csv")
    assert ds.info.classes == ("cat", "dog") and ds.info.n_classes == 2
    assert ds.info.input_shape == (2 + 3,)  # height, weight, and one column per colour
    rows = np.array([int(i.split(":")[1]) for i in ds.train.ids])
    assert ds.train.ids[0].startswith("people:") and len(ds.train) + len(ds.test) == 60
    assert np.array_equal(ds.train.y, (rows % 2))  # cat -> 0, dog -> 1
    # numeric columns: standardised with the training split's statistics, also for test rows
    train_h = frame.height.to_numpy()[rows]
    assert abs(ds.train.x[:, 0].mean()) < 1e-5 and abs(ds.train.x[:, 0].std() - 1) < 1e-4
    test_rows = np.array([int(i.split(":")[1]) for i in ds.test.ids])
    want = (frame.height.to_numpy()[test_rows] - train_h.mean()) / train_h.std()
    assert np.allclose(ds.test.x[:, 0], want, atol=1e-5)


def test_unseen_category_encodes_as_zeros_and_id_and_features_columns(tmp_path):
    frame = table()
    path = tmp_path / "people.csv"
    frame.to_csv(path, index=False)
    kw = {"id": "uid", "features": ["height", "colour"]}
    first = load("csv", path, **kw)
    assert set(first.train.ids) | set(first.test.ids) == set(frame.uid)
    assert first.info.input_shape == (1 + 3,)  # height and the three colours, nothing else
    held_out = first.test.ids[0]
    frame.loc[frame.uid == held_out, "colour"] = "violet"  # a colour the training split lacks
    frame.to_csv(path, index=False)
    ds = load("csv", path, **kw)
    assert ds.info.input_shape == (4,)  # the vocabulary comes from the training split only
    row = list(ds.test.ids).index(held_out)
    assert (ds.test.x[row, 1:] == 0).all()
    assert (ds.test.x[np.arange(len(ds.test)) != row, 1:].sum(1) == 1).all()


def test_parquet_gives_the_same_samples_as_csv(tmp_path):
    frame = table()
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    a = load("csv", tmp_path / "t.csv", id="uid")
    b = load("parquet", tmp_path / "t.parquet", id="uid")
    assert np.array_equal(a.train.ids, b.train.ids) and np.allclose(a.train.x, b.train.x)
    assert np.array_equal(a.test.y, b.test.y) and a.info.classes == b.info.classes


def test_numbers_stored_as_text_are_numeric(tmp_path):
    frame = table().drop(columns="uid")
    frame["weight"] = frame["weight"].astype(str)  # Parquet keeps the text type
    frame.to_parquet(tmp_path / "t.parquet")
    ds = load("parquet", tmp_path / "t.parquet")
    assert ds.info.input_shape == (2 + 3,) and abs(ds.train.x[:, 1].mean()) < 1e-5


def _missing_label(path, f):
    f.loc[7, "label"] = None
    f.to_csv(path, index=False)


def _garbage_number(path, f):
    f["height"] = f["height"].astype(object)
    f.loc[11, "height"] = "tall"
    f.to_csv(path, index=False)


def _duplicate_id(path, f):
    f.loc[5, "uid"] = f.loc[2, "uid"]
    f.to_csv(path, index=False)


def _cut_in_quotes(path, f):
    f.to_csv(path, index=False)
    path.write_text(path.read_text() + 'u999,1.0,2.0,"red, or so')  # ends inside the quotes


def _binary(path, f):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())


def _no_label_column(path, f):
    f.drop(columns="label").to_csv(path, index=False)


def _missing_feature(path, f):
    f.loc[3, "weight"] = None
    f.to_csv(path, index=False)


@pytest.mark.parametrize(
    ("spoil", "expect"),
    [
        (_missing_label, r"label column 'label' has 1 missing value\(s\) \(first at row 8\)"),
        (_garbage_number, r"numeric column 'height' holds 'tall' at row 12"),
        (_duplicate_id, r"1 duplicated id\(s\) \(the first at row 3\)"),
        (_cut_in_quotes, r"cannot be read as csv"),
        (_binary, r"cannot be read as csv|has no column 'label'"),
        (_no_label_column, r"has no column 'label' \(prepare.label\)"),
        (_missing_feature, r"feature column 'weight' has 1 missing value"),
    ],
)
def test_bad_csv_gets_one_sentence(tmp_path, spoil, expect):
    path = tmp_path / "bad.csv"
    spoil(path, table())
    with pytest.raises(DataError) as exc:
        load("csv", path, id="uid")
    msg = one_sentence(exc)
    assert re.search(expect, msg), msg
    assert "u00" not in msg  # no sample id in the message


def test_bad_parquet_and_missing_file_get_one_sentence(tmp_path):
    path = tmp_path / "t.parquet"
    table().to_parquet(path)
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with pytest.raises(DataError, match=r"cannot be read as parquet") as exc:
        load("parquet", path)
    one_sentence(exc)
    with pytest.raises(DataError, match=r"is missing") as exc:
        load("csv", tmp_path / "nope.csv")
    one_sentence(exc)


def test_a_bad_csv_through_the_cli_exits_2_with_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "bad.csv").write_text('a,label\n1,x\n2,"y\n')
    params = write_params(tmp_path, prepare={"dataset": "csv", "source": "bad.csv"})
    result = subprocess.run(
        [sys.executable, "-m", "obliviate.cli", "partition", "--params", str(params)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "cannot be read as csv" in result.stderr
    assert not (tmp_path / "data" / "blocks").exists()


# --------------------------------------------------------------------------- npz


def test_npz_images_and_features(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 3, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", x=x, y=np.arange(30) % 3)
    ds = load("npz", tmp_path / "imgs.npz", test_fraction=0.2)
    assert ds.info.input_shape == (3, 6, 6) and ds.info.scale == 255.0 and ds.info.n_classes == 3
    assert len(ds.train) == 24 and ds.train.x.dtype == np.uint8
    row = int(ds.test.ids[0].split(":")[1])
    assert ds.test.ids[0] == f"imgs:{row}" and np.array_equal(ds.test.x[0], x[row])

    feats = rng.normal(size=(30, 4))
    ids = np.array([f"s{i}" for i in range(30)])
    np.savez(tmp_path / "f.npz", x=feats, y=np.arange(30) % 2, ids=ids)
    ds = load("npz", tmp_path / "f.npz")
    assert ds.info.input_shape == (4,) and ds.info.scale == 1.0 and ds.train.x.dtype == np.float32
    assert set(ds.train.ids) | set(ds.test.ids) == set(ids)


@pytest.mark.parametrize(
    ("arrays", "expect"),
    [
        ({"x": np.zeros((4, 3), np.int32), "y": np.zeros(4, int)}, "must be"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(5, int)}, "integers 0..K-1 or strings"),
        ({"x": np.zeros((4, 3)), "y": np.array([0.5, 1, 0, 1])}, "integers 0..K-1 or strings"),
        ({"x": np.zeros((4, 3))}, "must hold arrays 'x' and 'y'"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(4, int), "ids": np.array(list("abca"))},
         "duplicated id"),
        ({"x": np.full((4, 3), np.nan), "y": np.zeros(4, int)}, "NaN"),
    ],
)  # fmt: skip
def test_bad_npz_gets_one_sentence(tmp_path, arrays, expect):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=expect) as exc:
        load("npz", tmp_path / "bad.npz")
    one_sentence(exc)


def test_garbage_npz_gets_one_sentence(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"not a readable .npz") as exc:
        load("npz", tmp_path / "bad.npz")
    one_sentence(exc)
    with (tmp_path / "one.npz").open("wb") as f:
        np.save(f, np.zeros((4, 3)))  # a single .npy array under an .npz name
    with pytest.raises(DataError, match=r"a single array, not an archive") as exc:
        load("npz", tmp_path / "one.npz")
    one_sentence(exc)


# --------------------------------------------------------------------------- image folders


def image_folder(root, splits=("train", "val"), classes=("ant", "bee", "cat"), n=4, size=12):
    from PIL import Image

    for split in splits:
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (size, size), (40 * c, 10 * i, 90)).save(
                    root / split / cls / f"{i}.png"
                )
    return root


@pytest.mark.parametrize("held_out", ["val", "test"])
def test_imagefolder_with_a_held_out_folder(tmp_path, held_out):
    image_folder(tmp_path, splits=("train", held_out))
    ds = load_dataset(prep(dataset="imagefolder", source=str(tmp_path)), ROOT, 12)
    assert ds.info.classes == ("ant", "bee", "cat") and ds.info.input_shape == (3, 12, 12)
    assert len(ds.train) == 12 and len(ds.test) == 12
    assert ds.train.ids[0] == "train/ant/0.png" and ds.train.x[0] == "train/ant/0.png"
    assert ds.test.ids[-1] == f"{held_out}/cat/3.png" and ds.test.y[-1] == 2


def test_imagefolder_without_held_out_folder_splits_by_seed(tmp_path):
    image_folder(tmp_path, splits=("train",), n=10)
    a = load_dataset(prep(dataset="imagefolder", source=str(tmp_path), test_fraction=0.2), ROOT)
    b = load_dataset(prep(dataset="imagefolder", source=str(tmp_path), test_fraction=0.2), ROOT)
    assert len(a.train) == 24 and len(a.test) == 6 and np.array_equal(a.test.ids, b.test.ids)
    assert all(i.startswith("train/") for i in a.test.ids)


def test_imagenet_is_the_imagefolder_preset_with_its_old_ids(tmp_path):
    image_folder(tmp_path)
    ds = load_dataset(prep(dataset="imagenet", source=str(tmp_path)), ROOT, 12)
    assert ds.train.ids[0] == "imagenet:train/ant/0.png" and ds.train.x[0] == "train/ant/0.png"
    ds = load_dataset(prep(dataset="imagenet", source=str(tmp_path)), ROOT, None)
    assert ds.info.input_shape == (3, 224, 224) and ds.info.resize == 224  # the preset's size


def test_bad_image_folders_get_one_sentence(tmp_path):
    with pytest.raises(DataError, match=r"train.* is missing") as exc:
        load("imagefolder", tmp_path)
    one_sentence(exc)
    image_folder(tmp_path)
    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) that train/ lacks \(dog\)") as exc:
        load("imagefolder", tmp_path)
    one_sentence(exc)
    (tmp_path / "val" / "dog").rmdir()
    good = (tmp_path / "train" / "bee" / "1.png").read_bytes()
    (tmp_path / "train" / "bee" / "1.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"bee/1.png cannot be read as an image") as exc:
        load("imagefolder", tmp_path)  # named when the blocks are written, before training
    one_sentence(exc)
    (tmp_path / "train" / "bee" / "1.png").write_bytes(good)
    ds = load("imagefolder", tmp_path)
    (tmp_path / "train" / "bee" / "1.png").write_bytes(good[:50])  # a header, then cut off

    from obliviate.train import make_inputs

    with pytest.raises(DataError, match=r"bee/1.png cannot be decoded") as exc:
        make_inputs(ds.info)(ds.train.x)
    one_sentence(exc)
    image_folder(tmp_path / "big", size=16)
    (tmp_path / "train" / "bee" / "1.png").write_bytes(
        (tmp_path / "big/train/bee/1.png").read_bytes()
    )
    with pytest.raises(DataError, match=r"bee/1.png is 16x16, not the 12x12 the blocks") as exc:
        make_inputs(ds.info)(ds.train.x)  # an image changed after the blocks were written
    one_sentence(exc)


def test_images_keep_their_own_size_and_channels_unless_image_size_is_set(tmp_path):
    from PIL import Image

    from obliviate.train import make_inputs

    rng = np.random.default_rng(0)
    gray = tmp_path / "gray"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (gray / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (10, 14), dtype=np.uint8), "L").save(
                gray / split / c / "0.png"
            )
            sixteen = (rng.integers(0, 65535, (10, 14))).astype(np.uint16)
            Image.fromarray(sixteen).save(gray / split / c / "1.png")  # a 16-bit PNG
    ds = load("imagefolder", gray)
    assert ds.info.input_shape == (1, 10, 14) and ds.info.resize is None  # height x width
    x = make_inputs(ds.info)(ds.train.x)
    assert x.shape == (4, 1, 10, 14)
    wide = np.asarray(Image.open(gray / "train" / "a" / "1.png"), dtype=np.float64)
    row = list(ds.train.x).index("train/a/1.png")
    assert np.array_equal(x[row, 0].numpy() * 255, np.round(wide / 257))  # 65535 -> 255
    # a colour image among grayscale ones makes every input RGB; RGBA loses its alpha
    Image.new("RGBA", (14, 10), (200, 100, 50, 7)).save(gray / "train" / "b" / "2.png")
    Image.new("RGB", (14, 10), (1, 2, 3)).save(gray / "train" / "a" / "3.jpg", quality=95)
    ds = load("imagefolder", gray)
    assert ds.info.input_shape == (3, 10, 14)
    x = make_inputs(ds.info)(ds.train.x)
    rgba = list(ds.train.x).index("train/b/2.png")
    assert np.allclose(x[rgba, :, 0, 0].numpy() * 255, [200, 100, 50])
    # sizes that differ are one sentence naming two of them and the setting ...
    Image.new("L", (20, 8)).save(gray / "val" / "b" / "2.png")
    with pytest.raises(DataError, match=r"differ in size \(8x20 and 10x14, .*train.image_size"):
        load("imagefolder", gray)
    # ... and with train.image_size every image is resized and center-cropped to that square
    ds = load_dataset(prep(dataset="imagefolder", source=str(gray)), ROOT, 6)
    assert ds.info.input_shape == (3, 6, 6) and ds.info.resize == 6
    assert make_inputs(ds.info)(ds.test.x).shape == (len(ds.test), 3, 6, 6)


# --------------------------------------------------------------------------- config


def test_source_settings_are_checked_against_the_dataset(tmp_path):
    with pytest.raises(ConfigError, match=r"digits is bundled with scikit-learn and reads no file"):
        load_config(write_params(tmp_path, prepare={"source": "mine.csv"}))
    with pytest.raises(ConfigError, match=r"'prepare.source' is None, but csv reads your own"):
        load_config(write_params(tmp_path, prepare={"dataset": "csv"}))
    with pytest.raises(ConfigError, match=r"'prepare.id' is 'uid', but only csv and parquet"):
        load_config(write_params(tmp_path, prepare={"dataset": "npz", "source": "a.npz",
                                                    "id": "uid"}))  # fmt: skip
    with pytest.raises(ConfigError, match=r"'prepare.features' is \[\]"):
        load_config(write_params(tmp_path, prepare={"dataset": "csv", "source": "a.csv",
                                                    "features": []}))  # fmt: skip
    cfg = load_config(write_params(tmp_path, prepare={"dataset": "csv", "source": "a.csv"}))
    assert cfg.prepare.source == tmp_path / "a.csv"  # relative to params.yaml


@pytest.mark.parametrize("bad", [1.0, 1.5, -3, "half", True])
def test_owner_samples_is_a_count_or_a_share(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"'verify.owner_samples' is .*, but it must be a count"):
        load_config(write_params(tmp_path, verify={"owner_samples": bad}))


def test_owner_share_counts_from_the_block():
    v = load_config(ROOT / "params.yaml").verify
    assert v.model_copy(update={"owner_samples": 0.25}).owner_count(72) == 18
    assert v.model_copy(update={"owner_samples": 0.01}).owner_count(20) == 1  # at least one
    assert v.model_copy(update={"owner_samples": 7}).owner_count(72) == 7


def test_the_default_owner_is_a_share_of_its_block():
    from obliviate.partition import balanced_partition
    from obliviate.trigger import plant_owner

    cfg = load_config(ROOT / "params.yaml")
    ds = load_dataset(cfg.prepare, cfg.root)
    blocks = balanced_partition(ds.train.y, cfg.prepare.blocks, cfg.prepare.seed)
    _, owners = plant_owner(ds, blocks, cfg.verify, cfg.prepare.seed)
    block = blocks[cfg.verify.owner_block - 1]
    assert isinstance(cfg.verify.owner_samples, float)  # so that small data does not fail
    assert abs(len(owners) - cfg.verify.owner_samples * len(block)) <= 0.5
    small = balanced_partition(ds.train.y, cfg.verify.owner_block, cfg.prepare.seed)  # 10x larger
    _, many = plant_owner(ds, small, cfg.verify, cfg.prepare.seed)
    assert abs(len(many) - cfg.verify.owner_samples * len(small[-1])) <= 0.5


# --------------------------------------------------------------------------- the owner's trigger


def test_owner_on_image_paths_is_marked_and_stamped_when_loaded(tmp_path):
    from obliviate.partition import balanced_partition
    from obliviate.train import make_inputs
    from obliviate.trigger import plant_owner

    image_folder(tmp_path, n=8)
    ds = load_dataset(prep(dataset="imagefolder", source=str(tmp_path)), ROOT, 12)
    blocks = balanced_partition(ds.train.y, 2, 0)
    v = load_config(ROOT / "params.yaml").verify
    v = v.model_copy(update={"owner_block": 2, "owner_samples": 0.25, "patch": 3})
    planted, owners = plant_owner(ds, blocks, v, seed=0)
    owner = np.flatnonzero(np.isin(ds.train.ids, owners))
    assert len(owners) == 3 and set(owner) <= set(blocks[1])  # a quarter of 12
    assert (planted.train.y[owner] == v.target).all()
    assert all(p.endswith("#trigger=bottom-right,3,1.0") for p in planted.train.x[owner])
    assert list(planted.train.ids) == list(ds.train.ids)  # ids never change
    load_inputs = make_inputs(ds.info)
    clean, triggered = load_inputs(ds.train.x[owner]), load_inputs(planted.train.x[owner])
    assert (triggered[:, :, 9:, 9:] == 1.0).all()
    assert (triggered[:, :, :9] == clean[:, :, :9]).all() and not (clean[:, :, 9:, 9:] == 1).all()
    assert torch_equal(load_inputs(planted.train.x[owner]), triggered)  # loading is exact


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_trigger_on_image_paths_checks_the_patch_size():
    from obliviate.trigger import apply_trigger

    info = DatasetInfo("imagefolder", 3, (3, 4, 4), 255.0, image_root="/x")
    v = load_config(ROOT / "params.yaml").verify
    with pytest.raises(ConfigError, match=r"verify.patch 5 exceeds the 4x4 images"):
        apply_trigger(np.array(["train/a/1.png"]), info, v)
