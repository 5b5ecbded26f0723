"""Data sources. Each loader returns train and test Samples with stable sample ids.

A sample id names the source, the split where the source has one, and the sample's index (or
relative path) in the source, e.g. ``fashion-mnist:train:12345``. It never depends on the
partition or on deletions, so audit records and requests can name samples forever.
"""

from __future__ import annotations

import gzip
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from obliviate.config import PrepareConfig
from obliviate.errors import DataError

# Where each source lives when params.yaml gives no `prepare.source`.
DEFAULT_SOURCES: dict[str, Path | None] = {
    "digits": None,  # bundled with scikit-learn
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),  # Debian dataset-fashion-mnist
    "mnist": Path("/usr/share/datasets/mnist"),
    "purchase": Path("data/raw/online_shoppers_intention.csv"),
    "cifar10": Path("data/raw/cifar10"),
    "svhn": Path("data/raw/svhn"),
    "imagenet": Path("data/raw/imagenet"),
    # the user's own data: prepare.source is required (config.NEEDS_SOURCE)
    "csv": None,
    "parquet": None,
    "npz": None,
    "imagefolder": None,
}


@dataclass(frozen=True)
class Samples:
    ids: np.ndarray  # (N,) str, stable sample ids
    y: np.ndarray  # (N,) int64 labels
    x: np.ndarray  # (N, C, H, W) uint8 images | (N, F) float32 features | (N,) str image paths
    slot: np.ndarray | None = None  # (N,) in a block: each sample's position when it was written

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, idx: np.ndarray) -> Samples:
        slot = None if self.slot is None else self.slot[idx]
        return Samples(self.ids[idx], self.y[idx], self.x[idx], slot)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    n_classes: int
    input_shape: tuple[int, ...]  # shape of one model input, e.g. (1, 28, 28) or (17,)
    scale: float  # model input = x / scale
    image_root: str | None = None  # imagefolder, imagenet: x holds paths relative to this folder
    classes: tuple[str, ...] | None = None  # class names by label, where the source has them
    resize: int | None = None  # image folders: resize the short side, center-crop to this square

    def __post_init__(self) -> None:  # a manifest read back from JSON gives lists
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))


@dataclass(frozen=True)
class Dataset:
    info: DatasetInfo
    train: Samples
    test: Samples


def load_dataset(cfg: PrepareConfig, root: Path, image_size: int | None = None) -> Dataset:
    """Load the source named by ``cfg.dataset``; a DataError names a missing or corrupt file."""
    source = cfg.source or DEFAULT_SOURCES[cfg.dataset]
    if source is not None and not source.is_absolute():
        source = root / source
    loader = _LOADERS[cfg.dataset]
    return loader(cfg, source, image_size)


# --------------------------------------------------------------------------- digits (default)


def _load_digits(cfg: PrepareConfig, source: Path | None, image_size: int) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    y = bunch.target.astype(np.int64)
    ids = np.array([f"digits:{i}" for i in range(len(y))])
    info = DatasetInfo("digits", 10, (1, 8, 8), scale=16.0)
    return _split(info, Samples(ids, y, x), cfg)


def _split(info: DatasetInfo, full: Samples, cfg: PrepareConfig) -> Dataset:
    """Seeded train/test split for sources without an official one."""
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(full))
    n_test = round(len(full) * cfg.test_fraction)
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return Dataset(info, full.take(train), full.take(test))


# --------------------------------------------------------------------------- IDX (MNIST family)

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally .gz) of unsigned bytes into an array."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(
            f"{path} cannot be read ({exc}); replace it with the original file."
        ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file; replace it with the original.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(
            f"{path} is truncated or corrupt (header says {dims}); replace it with the original."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(source: Path, stem: str) -> Path:
    for candidate in (source / stem, source / f"{stem}.gz", source / "raw" / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{source / stem}(.gz) is missing; install the data there or set prepare.source "
        f"(set prepare.download: true to fetch it with torchvision)."
    )


def _load_idx(cfg: PrepareConfig, source: Path, image_size: int) -> Dataset:
    if cfg.download:
        _torchvision_download(cfg.dataset, source)
    splits = {}
    for split, (img_stem, lbl_stem) in _IDX_FILES.items():
        images, labels = read_idx(_find(source, img_stem)), read_idx(_find(source, lbl_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{source}: {split} images {images.shape} and labels {labels.shape} do not match; "
                "replace them with the original files."
            )
        ids = np.array([f"{cfg.dataset}:{split}:{i}" for i in range(len(labels))])
        splits[split] = Samples(ids, labels.astype(np.int64), images[:, None].copy())
    h, w = splits["train"].x.shape[2:]
    info = DatasetInfo(cfg.dataset, 10, (1, h, w), scale=255.0)
    return Dataset(info, splits["train"], splits["test"])


def _torchvision_download(name: str, source: Path) -> None:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]
    try:
        for train in (True, False):
            ds = cls(str(source), train=train, download=True)
            # torchvision keeps the raw IDX files under <root>/<Class>/raw
            for f in Path(ds.raw_folder).iterdir():
                target = source / f.name
                if not target.exists():
                    target.symlink_to(f)
    except Exception as exc:  # network errors take many forms
        raise DataError(
            f"downloading {name} into {source} failed ({exc}); check the network."
        ) from exc


# --------------------------------------------------------------------------- purchase (tabular)

_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "June", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_VISITOR = ["New_Visitor", "Returning_Visitor", "Other"]
PURCHASE_COLUMNS = [
    "Administrative",
    "Administrative_Duration",
    "Informational",
    "Informational_Duration",
    "ProductRelated",
    "ProductRelated_Duration",
    "BounceRates",
    "ExitRates",
    "PageValues",
    "SpecialDay",
    "Month",
    "OperatingSystems",
    "Browser",
    "Region",
    "TrafficType",
    "VisitorType",
    "Weekend",
    "Revenue",
]


def _load_purchase(cfg: PrepareConfig, source: Path, image_size: int | None) -> Dataset:
    """UCI Online Shoppers Intention, read by the csv source's reader (the same errors): 17
    features, label Revenue. The preset keeps the encoding its published benchmarks were measured
    with: Month and VisitorType as ordinal codes, every feature standardised on the training split.
    """
    frame = _read_table(cfg, source, "csv")
    if list(frame.columns) != PURCHASE_COLUMNS:
        raise DataError(
            f"{source} does not have the UCI Online Shoppers header; use the original CSV."
        )
    for col in PURCHASE_COLUMNS:
        _require_present(frame[col], source, f"column {col!r}")
    try:
        months = frame["Month"].map({m: i for i, m in enumerate(_MONTHS)})
        visitor = frame["VisitorType"].map({v: i for i, v in enumerate(_VISITOR)})
        for col, coded in (("Month", months), ("VisitorType", visitor)):
            if coded.isna().any():
                raise ValueError(f"{col} {frame[col][coded.isna()].iloc[0]!r} is not a known value")
        feats = np.column_stack([
            frame[PURCHASE_COLUMNS[:10]].to_numpy(np.float64), months.to_numpy(np.float64),
            frame[PURCHASE_COLUMNS[11:15]].to_numpy(np.float64), visitor.to_numpy(np.float64),
            _bools(frame["Weekend"]),
        ])  # fmt: skip
        y = _bools(frame["Revenue"]).astype(np.int64)
    except (ValueError, TypeError) as exc:
        raise DataError(
            f"{source} has a malformed row ({_short(str(exc), 60)}); use the original CSV."
        ) from exc
    ids = _row_ids("purchase", len(frame))
    info = DatasetInfo("purchase", 2, (feats.shape[1],), scale=1.0)
    ds = _split(info, Samples(ids, y, feats), cfg)
    # Standardise with train statistics only.
    mean, std = ds.train.x.mean(0), ds.train.x.std(0) + 1e-8
    norm = lambda s: Samples(s.ids, s.y, ((s.x - mean) / std).astype(np.float32))  # noqa: E731
    return Dataset(info, norm(ds.train), norm(ds.test))


def _bools(values) -> np.ndarray:
    """A TRUE/FALSE column (pandas reads it as bool, or as text when a value is neither)."""
    if values.dtype == bool:
        return values.to_numpy(np.float64)
    text = values.astype(str).str.upper()
    bad = ~text.isin(["TRUE", "FALSE"])
    if bad.any():
        raise ValueError(f"expected TRUE/FALSE, got {values[bad].iloc[0]!r}")
    return (text == "TRUE").to_numpy(np.float64)


# --------------------------------------------------------------------------- torchvision sets


def _load_torchvision(cfg: PrepareConfig, source: Path, image_size: int) -> Dataset:
    from torchvision import datasets

    if not source.is_dir() and not cfg.download:
        raise DataError(
            f"{source} is missing; put the {cfg.dataset} files there, set prepare.source, "
            "or set prepare.download: true."
        )
    splits = {}
    try:
        for split in ("train", "test"):
            if cfg.dataset == "cifar10":
                ds = datasets.CIFAR10(str(source), train=split == "train", download=cfg.download)
                x, y = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), ds.targets
            else:
                ds = datasets.SVHN(str(source), split=split, download=cfg.download)
                x, y = ds.data, ds.labels
            y = np.asarray(y, dtype=np.int64)
            ids = np.array([f"{cfg.dataset}:{split}:{i}" for i in range(len(y))])
            splits[split] = Samples(ids, y, x.astype(np.uint8))
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted."
        raise DataError(
            f"{cfg.dataset} under {source}: {exc} Replace the files or download them."
        ) from exc
    info = DatasetInfo(cfg.dataset, 10, tuple(splits["train"].x.shape[1:]), scale=255.0)
    return Dataset(info, splits["train"], splits["test"])


def _load_imagefolder(cfg: PrepareConfig, source: Path, image_size: int) -> Dataset:
    """An image folder: ``train/<class>/...`` and optionally ``val/`` or ``test/`` with the same
    classes (else a seeded split of train/). Samples stay on disk: blocks hold relative paths."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not (source / "train").is_dir():
        raise DataError(
            f"{source / 'train'} is missing; point prepare.source at a folder with "
            "train/<class>/<image> (and optionally val/ or test/)."
        )
    try:
        classes, class_to_idx = find_classes(str(source / "train"))
    except FileNotFoundError as exc:
        raise DataError(f"{source / 'train'} has no class folders; add train/<class>/.") from exc
    prefix = "imagenet:" if cfg.dataset == "imagenet" else ""  # imagenet's ids predate the preset

    def scan(folder: Path) -> Samples:
        extra = sorted({p.name for p in folder.iterdir() if p.is_dir()} - set(classes))
        if extra:
            raise DataError(
                f"{folder} has class folder(s) that train/ lacks ({_short(', '.join(extra))}); "
                "add them to train/ or remove them."
            )
        try:
            found = make_dataset(str(folder), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
        except FileNotFoundError as exc:  # torchvision: "Found no valid file for the classes"
            raise DataError(f"{folder}: {exc}; add images there.") from exc
        rel = np.array([Path(p).relative_to(source).as_posix() for p, _ in found])
        y = np.array([c for _, c in found], dtype=np.int64)
        return Samples(np.char.add(prefix, rel) if len(rel) else rel, y, rel)

    train = scan(source / "train")
    if len(train) == 0 or len(np.unique(train.y)) < len(classes):
        raise DataError(f"{source / 'train'} has a class folder without images; add images.")
    held_out = [source / f for f in ("val", "test") if (source / f).is_dir()]
    test = scan(held_out[0]) if held_out else None
    if cfg.dataset == "imagenet":  # a preset: RGB at 224 unless train.image_size says otherwise
        channels, size, resize = 3, (image_size or IMAGENET_SIZE,) * 2, image_size or IMAGENET_SIZE
    else:  # the images' own channels and, unless train.image_size is set, their own size
        paths = np.concatenate([train.x, test.x]) if test is not None else train.x
        channels, size = _image_shape(source, paths, image_size)
        resize = image_size
        size = (image_size, image_size) if image_size else size
    info = DatasetInfo(
        cfg.dataset, len(classes), (channels, *size), 255.0,
        image_root=str(source), classes=tuple(classes), resize=resize,
    )  # fmt: skip
    return _split(info, train, cfg) if test is None else Dataset(info, train, test)


IMAGENET_SIZE = 224  # the imagenet preset's input size when train.image_size is null
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # one channel in


def _image_shape(root: Path, paths: np.ndarray, image_size: int | None):
    """Channels (1 when every image is grayscale, else 3) and the common (H, W) of the images,
    from their headers only; a DataError names a file that is not an image, or, when sizes differ
    and train.image_size is null, two of the sizes."""
    from PIL import Image, UnidentifiedImageError

    sizes, gray = set(), True
    for rel in paths:
        try:
            with Image.open(root / str(rel)) as im:
                sizes.add((im.height, im.width))
                gray = gray and im.mode in GRAY_MODES
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(
                f"{root / str(rel)} cannot be read as an image ({type(exc).__name__}); replace "
                "or remove it."
            ) from None
        if len(sizes) > 1 and image_size is None:
            (h1, w1), (h2, w2) = sorted(sizes)[:2]
            raise DataError(
                f"the images in {root} differ in size ({h1}x{w1} and {h2}x{w2}, height x width); "
                "set train.image_size to resize them all to one square."
            )
    return (1 if gray else 3), next(iter(sizes))


def read_image(path: Path, channels: int = 3):
    """One image file as a (channels, H, W) uint8 tensor, decoded by Pillow: RGBA loses its
    alpha, a palette becomes RGB, 16-bit grayscale is scaled to 8 bits (v / 257). A DataError
    names a file that will not decode."""
    import torch
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):  # 16-bit grayscale
                wide = np.clip(np.asarray(im, dtype=np.float64), 0, 65535)
                im = Image.fromarray(np.round(wide / 257).astype(np.uint8))  # 65535 -> 255
            pixels = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{path} cannot be decoded as an image; replace or remove it, then rerun "
            "`obliviate partition`."
        ) from exc
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(np.array(pixels, order="C"))  # a writable copy


# --------------------------------------------------------------------------- npz arrays


def _load_npz(cfg: PrepareConfig, source: Path, image_size: int) -> Dataset:
    """An .npz with ``x`` ((N, C, H, W) uint8 images or (N, F) float features), ``y`` (N,)
    integer labels 0..K-1 or string labels, and optionally ``ids`` (N,) of text or numbers; a
    seeded train/test split."""
    import zipfile

    if not source.is_file():
        raise DataError(f"{source} is missing; set prepare.source to your .npz file.")
    try:
        loaded = np.load(source, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an archive")
        with loaded as z:
            arrays = {k: z[k] for k in ("x", "y", "ids") if k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{source} is not a readable .npz archive ({_short(str(exc))}); "
            "write it with numpy.savez (no object arrays)."
        ) from exc
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{source} must hold arrays 'x' and 'y' (and optionally 'ids'); add them.")
    x, y = arrays["x"], arrays["y"]
    images = x.dtype == np.uint8 and x.ndim == 4
    if not images and not (x.ndim == 2 and np.issubdtype(x.dtype, np.floating)):
        raise DataError(
            f"{source}: x is {x.dtype} {x.shape}, but must be (N, C, H, W) uint8 images or "
            "(N, F) float features; convert it."
        )
    text_labels = y.dtype.kind == "U"
    integer_labels = np.issubdtype(y.dtype, np.integer) and not (y < 0).any()
    if y.ndim != 1 or len(y) != len(x) or not (text_labels or integer_labels):
        raise DataError(
            f"{source}: y must be {len(x)} labels, integers 0..K-1 or strings (one per row of x); "
            "fix it."
        )
    if not images and not np.isfinite(x).all():
        raise DataError(f"{source}: x has NaN or infinite values; fill or drop those rows.")
    if "ids" in arrays:
        if arrays["ids"].shape != y.shape:
            raise DataError(f"{source}: ids must have one entry per row of x; fix it.")
        ids = sample_ids(arrays["ids"], f"{source}: ids")
    else:
        ids = _row_ids(source.stem, len(y))
    classes = None
    if text_labels:  # class k: the k-th label in sorted order, as for a table's text labels
        names, y = np.unique(y, return_inverse=True)
        classes = tuple(str(c) for c in names)
    x = x if images else x.astype(np.float32)
    n_classes = len(classes) if classes else (int(y.max()) + 1 if len(y) else 0)
    info = DatasetInfo("npz", n_classes, tuple(x.shape[1:]), 255.0 if images else 1.0,
                       classes=classes)  # fmt: skip
    return _split(info, Samples(ids, y.astype(np.int64), x), cfg)


# --------------------------------------------------------------------------- csv, parquet


def _load_table(cfg: PrepareConfig, source: Path, image_size: int) -> Dataset:
    """A table of the user's (CSV or Parquet, read by pandas / pyarrow): one row per sample.

    Numeric features are standardised and categorical ones one-hot encoded, both fit on the
    training split only (a category the training split never saw encodes as all zeros).
    """
    import pandas as pd

    frame = _read_table(cfg, source, cfg.dataset)
    label, id_col = cfg.label, cfg.id
    named = [("label", label), ("id", id_col)] + [("features", f) for f in cfg.features or []]
    for key, col in named:
        if col is not None and col not in frame.columns:
            raise DataError(
                f"{source} has no column {_short(col)!r} (prepare.{key}); its columns are "
                f"{_short(', '.join(map(str, frame.columns)))}."
            )
    features = list(cfg.features or [c for c in frame.columns if c not in (label, id_col)])
    if label in features or (id_col is not None and id_col in features):
        raise DataError("prepare.features must not include the label or id column; remove it.")
    if not features:
        raise DataError(f"{source} has no feature columns besides the label; add some.")
    if len(frame) == 0:
        raise DataError(f"{source} has no rows; add samples.")
    _require_present(frame[label], source, f"label column {label!r}")
    if id_col is None:
        ids = _row_ids(source.stem, len(frame))
    else:
        _require_present(frame[id_col], source, f"id column {id_col!r}")
        what = f"{source}: the id column {id_col!r}"
        ids = sample_ids(frame[id_col].astype(str).to_numpy(), what)
    labels = (
        frame[label] if pd.api.types.is_numeric_dtype(frame[label]) else frame[label].astype(str)
    )
    classes, y = np.unique(labels.to_numpy(), return_inverse=True)  # class k: the k-th in order
    numeric, categorical = _column_kinds(frame, features, source)
    for col in features:
        _require_present(frame[col], source, f"feature column {col!r}")
    info = DatasetInfo(cfg.dataset, len(classes), (0,), 1.0,
                       classes=tuple(str(c) for c in classes))  # fmt: skip
    rows = np.arange(len(frame))  # split row numbers, then fit the encoding on train rows only
    split = _split(info, Samples(ids, y.astype(np.int64), rows), cfg)
    encode = _fit_encoder(frame.iloc[split.train.x], numeric, categorical)
    train_x, test_x = encode(frame.iloc[split.train.x]), encode(frame.iloc[split.test.x])
    info = replace(info, input_shape=(train_x.shape[1],))
    return Dataset(
        info,
        Samples(split.train.ids, split.train.y, train_x),
        Samples(split.test.ids, split.test.y, test_x),
    )


def _read_table(cfg: PrepareConfig, source: Path, kind: str):
    """The one table reader (pandas / pyarrow) of every table source and preset. CSV: a UTF-8
    file, with or without a byte-order mark, fields separated by ``prepare.sep``, quoted where they
    hold it; the id column is read as text, so ``007`` stays ``007``."""
    import pandas as pd

    if not source.is_file():
        raise DataError(f"{source} is missing; set prepare.source to your {cfg.dataset} file.")
    try:
        if kind == "parquet":
            return pd.read_parquet(source, engine="pyarrow")
        text_id = {cfg.id: str} if cfg.id is not None else None
        return pd.read_csv(source, sep=cfg.sep, encoding="utf-8-sig", dtype=text_id,
                           float_precision="round_trip")  # fmt: skip
    except Exception as exc:  # pandas and pyarrow raise many types for a damaged file
        detail = (str(exc) or type(exc).__name__).splitlines()[0]
        raise DataError(
            f"{source} cannot be read as {cfg.dataset} ({_short(detail, 60)}); "
            "replace it with a complete, valid file."
        ) from exc


def _column_kinds(frame, features: list[str], source: Path) -> tuple[list[str], list[str]]:
    """Numeric and categorical feature columns (numbers stored as text are converted in place).
    A text column whose values are mostly numbers is a numeric column with garbage in it: an
    error, not a category per typo."""
    import pandas as pd

    numeric, categorical = [], []
    for col in features:
        values = frame[col]
        if pd.api.types.is_numeric_dtype(values):
            numeric.append(col)
            continue
        present = values.dropna()
        as_number = pd.to_numeric(present, errors="coerce")
        if len(present) and as_number.notna().all():  # numbers stored as text
            frame[col] = pd.to_numeric(values)
            numeric.append(col)
            continue
        if as_number.notna().mean() > 0.5:
            row = int(np.flatnonzero(as_number.isna().to_numpy())[0])
            raise DataError(
                f"{source}: numeric column {_short(str(col))!r} holds "
                f"{_short(str(present.iloc[row]))!r} at row {present.index[row] + 1}; "
                "fix or remove that value."
            )
        categorical.append(col)
    return numeric, categorical


def _fit_encoder(train, numeric: list[str], categorical: list[str]):
    """Standardise numeric columns and one-hot encode categorical ones, fit on ``train``."""
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    scaler = StandardScaler().fit(train[numeric].to_numpy(np.float64)) if numeric else None
    onehot = None
    if categorical:
        onehot = OneHotEncoder(handle_unknown="ignore", sparse_output=False, dtype=np.float32)
        onehot.fit(train[categorical].astype(str).to_numpy())

    def encode(frame) -> np.ndarray:
        parts = []
        if scaler is not None:
            parts.append(scaler.transform(frame[numeric].to_numpy(np.float64)))
        if onehot is not None:
            parts.append(onehot.transform(frame[categorical].astype(str).to_numpy()))
        return np.concatenate(parts, axis=1).astype(np.float32)

    return encode


def _require_present(values, source: Path, what: str) -> None:
    missing = np.flatnonzero(values.isna().to_numpy())
    if len(missing):
        raise DataError(
            f"{source}: the {what} has {len(missing)} missing value(s) (first at row "
            f"{missing[0] + 1}); fill them or drop those rows."
        )


MAX_ID_LENGTH = 256  # characters; an id is stored as fixed-width unicode, padded to the longest


def sample_ids(values: np.ndarray, what: str) -> np.ndarray:
    """A source's own ids as fixed-width unicode (never pickled objects): any text, numbers too,
    up to MAX_ID_LENGTH characters; an empty, overlong or duplicated id, or one holding a line
    break or other control character, is a DataError naming its row."""
    ids = np.asarray([str(v) for v in values], dtype=str) if len(values) else np.array([], "<U1")
    for row, sid in enumerate(ids, start=1):
        if not sid.strip():
            raise DataError(f"{what} is empty at row {row}; give every sample an id.")
        if len(sid) > MAX_ID_LENGTH:
            raise DataError(
                f"{what} at row {row} is {len(sid)} characters long, over the "
                f"{MAX_ID_LENGTH} allowed; shorten the ids (a hash of the original will do)."
            )
        if any(unicodedata.category(c) == "Cc" for c in sid):
            raise DataError(
                f"{what} at row {row} holds a line break or other control character; "
                "remove it from the id."
            )
    _require_unique(ids, what)
    return ids


def _require_unique(ids: np.ndarray, what: str) -> None:
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        rows = np.sort(first[counts > 1]) + 1
        raise DataError(
            f"{what} has {int((counts > 1).sum())} duplicated id(s) (the first at row {rows[0]}); "
            "make every id unique."
        )


def _row_ids(prefix: str, n: int) -> np.ndarray:
    return np.array([f"{prefix}:{i}" for i in range(n)])


def _short(text: str, limit: int = 40) -> str:
    """A value for an error message, cut so that no long user content ends up in logs."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


_LOADERS: dict[str, Callable[[PrepareConfig, Path, int], Dataset]] = {
    "digits": _load_digits,
    "fashion-mnist": _load_idx,
    "mnist": _load_idx,
    "purchase": _load_purchase,
    "cifar10": _load_torchvision,
    "svhn": _load_torchvision,
    "imagenet": _load_imagefolder,  # a preset: the default place data/raw/imagenet
    "imagefolder": _load_imagefolder,
    "npz": _load_npz,
    "csv": _load_table,
    "parquet": _load_table,
}
