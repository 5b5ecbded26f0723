"""Data sources. Each loader returns train and test Samples with stable sample ids.

A sample id names the source, the split where the source has one, and the sample's index (or
relative path) in the source, e.g. ``fashion-mnist:train:12345``. It never depends on the
partition or on deletions, so audit records and requests can name samples forever.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Callable
from dataclasses import dataclass
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
    image_root: str | None = None  # imagenet: x holds paths relative to this folder


@dataclass(frozen=True)
class Dataset:
    info: DatasetInfo
    train: Samples
    test: Samples


def load_dataset(cfg: PrepareConfig, root: Path, image_size: int = 224) -> Dataset:
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


def _load_purchase(cfg: PrepareConfig, source: Path, image_size: int) -> Dataset:
    """UCI Online Shoppers Intention: 17 features, label Revenue; features standardised."""
    if not source.is_file():
        raise DataError(
            f"{source} is missing; set prepare.source to the UCI online_shoppers_intention.csv."
        )
    with source.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != PURCHASE_COLUMNS:
            raise DataError(
                f"{source} does not have the UCI Online Shoppers header; use the original CSV."
            )
        rows = list(reader)
    try:
        feats = np.array([_purchase_row(r) for r in rows], dtype=np.float64)
        y = np.array([_bool(r["Revenue"]) for r in rows], dtype=np.int64)
    except (ValueError, KeyError) as exc:
        raise DataError(f"{source} has a malformed row ({exc}); use the original CSV.") from exc
    ids = np.array([f"purchase:{i}" for i in range(len(rows))])
    info = DatasetInfo("purchase", 2, (feats.shape[1],), scale=1.0)
    ds = _split(info, Samples(ids, y, feats), cfg)
    # Standardise with train statistics only.
    mean, std = ds.train.x.mean(0), ds.train.x.std(0) + 1e-8
    norm = lambda s: Samples(s.ids, s.y, ((s.x - mean) / std).astype(np.float32))  # noqa: E731
    return Dataset(info, norm(ds.train), norm(ds.test))


def _bool(v: str) -> int:
    if v.upper() not in ("TRUE", "FALSE"):
        raise ValueError(f"expected TRUE/FALSE, got {v!r}")
    return int(v.upper() == "TRUE")


def _purchase_row(r: dict[str, str]) -> list[float]:
    numeric = [float(r[c]) for c in PURCHASE_COLUMNS[:10]]
    codes = [float(r[c]) for c in PURCHASE_COLUMNS[11:15]]
    return [
        *numeric,
        float(_MONTHS.index(r["Month"])),
        *codes,
        float(_VISITOR.index(r["VisitorType"])),
        float(_bool(r["Weekend"])),
    ]


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


def _load_imagenet(cfg: PrepareConfig, source: Path, image_size: int) -> Dataset:
    """An ImageFolder root with train/ and val/; samples stay on disk, blocks hold paths."""
    from torchvision.datasets import ImageFolder

    splits = {}
    classes = None
    for split, folder in (("train", "train"), ("test", "val")):
        if not (source / folder).is_dir():
            raise DataError(
                f"{source / folder} is missing; point prepare.source at an ImageFolder."
            )
        ds = ImageFolder(str(source / folder))
        if classes is not None and ds.classes != classes:
            raise DataError(f"{source}: train/ and val/ have different classes; fix the folders.")
        classes = ds.classes
        rel = np.array([str(Path(p).relative_to(source)) for p, _ in ds.samples])
        y = np.array([c for _, c in ds.samples], dtype=np.int64)
        ids = np.array([f"imagenet:{r}" for r in rel])
        splits[split] = Samples(ids, y, rel)
    info = DatasetInfo(
        "imagenet", len(classes), (3, image_size, image_size), 255.0, image_root=str(source)
    )
    return Dataset(info, splits["train"], splits["test"])


_LOADERS: dict[str, Callable[[PrepareConfig, Path, int], Dataset]] = {
    "digits": _load_digits,
    "fashion-mnist": _load_idx,
    "mnist": _load_idx,
    "purchase": _load_purchase,
    "cifar10": _load_torchvision,
    "svhn": _load_torchvision,
    "imagenet": _load_imagenet,
}
