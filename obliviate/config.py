"""params.yaml, read in one place into typed, validated objects.

Every other module receives these objects; none reads params.yaml or holds a literal path.
Relative paths in params.yaml are resolved against the folder that holds params.yaml.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from obliviate.errors import ConfigError, shown_path
from obliviate.objectstore import Location, StoreURL, is_url

DatasetName = Literal[
    "digits", "fashion-mnist", "mnist", "purchase", "cifar10", "svhn", "imagenet",
    "csv", "parquet", "npz", "imagefolder",
]  # fmt: skip
TABULAR = ("csv", "parquet")  # the sources that take prepare.label, prepare.id, prepare.features
NEEDS_SOURCE = ("csv", "parquet", "npz", "imagefolder")  # the user's own data: no default place
PRESET_MODELS = ("lenet5", "mlp", "resnet18", "vgg11", "resnet50")
# a preset, torchvision:<name>, or an import path pkg.module:factory
_MODEL_NAME = re.compile(r"torchvision:\w+|[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _model_name(v: str) -> str:
    if v not in PRESET_MODELS and not _MODEL_NAME.fullmatch(v):
        raise ValueError(
            "it should be one of "
            + ", ".join(PRESET_MODELS)
            + ", torchvision:<name> or an import path pkg.module:factory"
        )
    return v


def _device(v: str) -> str:
    if not _DEVICE.fullmatch(v):
        raise ValueError("it should be auto, cpu, cuda or cuda:N")
    return v


ModelName = Annotated[str, AfterValidator(_model_name)]
DeviceName = Annotated[str, AfterValidator(_device)]


class _Section(BaseModel):
    # Every key is required (params.yaml is the only place defaults live); unknown keys and
    # wrong types are errors, never silently ignored or coerced.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _location(value: object) -> Location:
    if isinstance(value, Path | StoreURL):
        return value
    raise PydanticCustomError("location", "input should be a path or a URL like s3://bucket/key")


# A local Path or, for the parameter stores only, an object-storage URL kept as a string.
StoreLocation = Annotated[
    Location,
    PlainValidator(_location),
    PlainSerializer(str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "path"}),
]
URL_KEYS = ("store", "naive_store")  # the only paths that may live on object storage


class PathsConfig(_Section):
    blocks: Path
    test: Path
    store: StoreLocation
    metrics: Path
    naive_store: StoreLocation
    audit: Path
    reports: Path
    state: Path


class PrepareConfig(_Section):
    dataset: DatasetName
    source: Path | None  # raw data directory or file; None: the dataset's default
    label: str = Field(min_length=1)  # csv, parquet: the label column
    id: str | None  # csv, parquet: the sample-id column; None: ids are <file stem>:<row>
    features: list[str] | None = Field(min_length=1)  # csv, parquet: None = all other columns
    sep: str = Field(min_length=1)  # csv: the field separator, e.g. "," or ";"
    download: bool  # torchvision download, only for sets torchvision can fetch
    test_fraction: float = Field(gt=0, lt=1)  # digits and purchase have no official split
    val_fraction: float = Field(ge=0, lt=1)  # label-balanced validation split, never trained on
    blocks: PositiveInt
    seed: int

    @field_validator("source")
    @classmethod
    def _source_fits(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        dataset = info.data.get("dataset")
        if dataset == "digits" and v is not None:
            raise PydanticCustomError(
                "source",
                "digits is bundled with scikit-learn and reads no file, so it must be null",
            )
        if dataset in NEEDS_SOURCE and v is None:
            raise PydanticCustomError(
                "source", "{dataset} reads your own data, so it must name your file or folder",
                {"dataset": dataset},
            )  # fmt: skip
        return v

    @field_validator("id", "features")
    @classmethod
    def _tabular_only(cls, v: object, info: ValidationInfo) -> object:
        dataset = info.data.get("dataset")
        if v is not None and dataset is not None and dataset not in TABULAR:
            raise PydanticCustomError(
                "tabular", "only csv and parquet have columns, so for {dataset} it must be null",
                {"dataset": dataset},
            )  # fmt: skip
        return v


class TrainConfig(_Section):
    model: ModelName
    model_args: dict[str, Any]  # keyword arguments of torchvision:/import-path model builders
    small_stem: bool  # torchvision: models: first conv 3x3 stride 1, no max-pool (small images)
    init: Path | None  # pretrained state dict (safetensors or .pt) loaded as P_0
    hidden: PositiveInt  # hidden width of the mlp
    image_size: PositiveInt | None  # image folders: resize to this square; None: native size
    # (imagenet: 224)
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)  # sgd only
    weight_decay: float = Field(ge=0)
    lr_schedule: Literal["constant", "cosine"]  # across blocks
    lr_final: float = Field(gt=0, le=1)  # cosine: last block's lr as a fraction of lr
    epochs: PositiveInt  # per block
    batch_size: PositiveInt
    keep_optimizer_state: bool  # carry momentum/Adam moments from block to block
    store_every: PositiveInt  # s: the store keeps P_0, P_B and every s-th row; the rest replay
    seed: int
    threads: PositiveInt  # torch intra-op threads; part of the replay contract
    device: DeviceName  # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16"]  # bf16: autocast the forward pass; rows stay float32
    workers: int = Field(ge=0)  # image folders: DataLoader worker processes


class EvaluateConfig(_Section):
    batch_size: PositiveInt
    device: DeviceName  # auto | cpu | cuda | cuda:N


class VerifyConfig(_Section):
    owner_block: int = Field(ge=0)
    owner_samples: int | float  # a count, or a share of the owner's block in (0, 1)
    target: int = Field(ge=0)
    patch: PositiveInt
    patch_value: float = Field(gt=0, le=1)
    patch_corner: Literal["top-left", "top-right", "bottom-left", "bottom-right"]
    features: list[int]
    feature_value: float
    queries: PositiveInt
    alpha: float = Field(gt=0, lt=1)
    min_power: float = Field(ge=0, le=1)
    q_source: Literal["clean", "control", "naive"]
    q_confidence: float = Field(gt=0, lt=1)

    @field_validator("owner_samples", mode="before")
    @classmethod
    def _count_or_share(cls, v: object) -> object:
        count = isinstance(v, int) and not isinstance(v, bool) and v >= 0
        share = isinstance(v, float) and 0 < v < 1
        if not (count or share):
            raise PydanticCustomError(
                "owner_samples",
                "it must be a count (0, 1, 2, ...) or a share of the block in (0, 1)",
            )
        return v

    @property
    def enabled(self) -> bool:
        return self.owner_block > 0 and self.owner_samples > 0

    def owner_count(self, block_size: int) -> int:
        """How many samples of a block of ``block_size`` the owner contributes (at least one)."""
        if isinstance(self.owner_samples, int):
            return self.owner_samples
        return max(1, round(self.owner_samples * block_size))


class ReportConfig(_Section):
    epsilons: list[float]
    samples: list[PositiveInt]
    positions: list[Literal["first", "middle", "last"]]
    shards: list[PositiveInt]


class ForgetConfig(_Section):
    epsilon: float = Field(gt=0)
    method: Literal["dfa", "fit"]
    min_blocks: PositiveInt
    max_blocks: PositiveInt
    # the accuracy guard: never serve a stitched M' whose accuracy on the validation split is,
    # with guard_confidence, below the original model's by more than this; retrain further
    # instead, up to the end of the store (which is naive retraining from block d)
    max_accuracy_drop: float | None = Field(ge=0, le=1)
    guard_confidence: float = Field(gt=0.5, lt=1)
    # what a refused stitch does: extend (retrain further, the request waits) or consolidate
    # (commit the stitched M' now, a consolidation makes it exact right after)
    on_refusal: Literal["extend", "consolidate"] = "extend"

    @model_validator(mode="after")
    def _order(self) -> ForgetConfig:
        if self.max_blocks < self.min_blocks:
            raise ValueError("forget.max_blocks must be at least forget.min_blocks")
        return self


def five_field_cron(expr: str) -> bool:
    """A cron schedule Prefect accepts: five fields (minute hour day month weekday), each with
    values in range (croniter parses it)."""
    from croniter import croniter

    return len(expr.split()) == 5 and croniter.is_valid(expr)


class ServeConfig(_Section):
    deployment: str = Field(min_length=1)  # the deployments' name (flows drain, consolidate)
    cron: str  # when the scheduled deployment drains the queued requests

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if not five_field_cron(v):
            raise ValueError(
                "it is not a 5-field cron schedule with valid values, e.g. '*/15 * * * *'"
            )
        return v


def parse_age(text: str) -> float:
    """'36h', '90m', '2d', '45s' -> seconds; ValueError otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:]
    try:
        value = float(number) * units[unit]
    except (KeyError, ValueError):
        raise ValueError(f"'{text[:40]}' is not an age such as 24h, 90m or 2d") from None
    if value <= 0:
        raise ValueError(f"'{text[:40]}' must be longer than 0")
    return value


class ConsolidateConfig(_Section):
    """When approximate deletions become exact (`obliviate consolidate`)."""

    cron: str  # the scheduled deployment: consolidate whatever is approximate
    max_age: str  # deadline: every deletion is exact at most this long after its commit
    max_pending: PositiveInt | None  # trigger: this many approximate deletions pending
    max_drift: float | None = Field(ge=0, le=1)  # trigger: validation accuracy this far down
    rounds: PositiveInt  # catch-up rounds when deletions change blocks meanwhile

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, v: str) -> str:
        if not five_field_cron(v):
            raise ValueError(
                "it is not a 5-field cron schedule with valid values, e.g. '0 3 * * *'"
            )
        return v

    @field_validator("max_age")
    @classmethod
    def _age(cls, v: str) -> str:
        parse_age(v)
        return v

    @property
    def max_age_s(self) -> float:
        return parse_age(self.max_age)

    @model_validator(mode="after")
    def _deadline_holds(self) -> ConsolidateConfig:
        from croniter import croniter

        runs = croniter(self.cron, 0)
        times = [runs.get_next(float) for _ in range(62)]  # two months of daily runs
        longest = max(b - a for a, b in itertools.pairwise(times))
        if longest > self.max_age_s:
            raise ValueError(
                f"consolidate.cron runs up to {longest / 3600:g} h apart, longer than "
                f"consolidate.max_age {self.max_age}, so a quiet spell could miss the deadline "
                "(schedule it at least that often, or raise max_age)"
            )
        return self


class Config(_Section):
    paths: PathsConfig
    prepare: PrepareConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    verify: VerifyConfig
    forget: ForgetConfig
    consolidate: ConsolidateConfig
    report: ReportConfig
    serve: ServeConfig
    root: Path = Path(".")  # folder of params.yaml; not a params.yaml key

    @model_validator(mode="after")
    def _guard_needs_validation(self) -> Config:
        if self.forget.max_accuracy_drop is not None and self.prepare.val_fraction == 0:
            raise ValueError(
                "forget.max_accuracy_drop needs a validation split: set prepare.val_fraction "
                "above 0 (e.g. 0.05) or the guard to null"
            )
        return self

    @model_validator(mode="after")
    def _absolute_paths(self) -> Config:
        root = self.root.resolve()
        resolved = {
            k: v if isinstance(v, StoreURL) else (root / v).resolve()
            for k, v in self.paths.model_dump().items()
        }
        object.__setattr__(self, "paths", PathsConfig(**resolved))
        object.__setattr__(self, "root", root)
        src = self.prepare.source
        if src is not None and not src.is_absolute():
            prep = self.prepare.model_copy(update={"source": (root / src).resolve()})
            object.__setattr__(self, "prepare", prep)
        init = self.train.init
        if init is not None and not init.is_absolute():
            train = self.train.model_copy(update={"init": (root / init).resolve()})
            object.__setattr__(self, "train", train)
        return self

    def fingerprint(self, *sections: str) -> str:
        """sha256 of the named sections, for telling whether an artifact was built with them."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_config(path: Path | str = "params.yaml", **overrides: dict) -> Config:
    """Read params.yaml into a validated Config; one clear ConfigError on any problem.

    ``overrides`` maps a section name to a dict of keys to replace (used by benchmarks and tests).
    """
    path = Path(path)
    where = shown_path(path)
    try:
        if path.is_dir():
            raise ConfigError(
                f"{where} is a folder, not a file; pass --params path/to/params.yaml."
            )
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(
            f"{where} does not exist; run from the project folder or pass --params."
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{where} cannot be read ({exc.strerror or exc}); pass a readable params.yaml."
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{where} is not valid UTF-8 (byte {exc.start}); save it as UTF-8."
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{where} is not valid YAML ({exc.__class__.__name__}); fix its syntax."
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where} must be a mapping of sections (paths, prepare, train, evaluate)."
        )
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw, root=path.parent, origin=str(path))


def config_from_dict(raw: dict, root: Path | str = ".", origin: str = "params") -> Config:
    if "root" in raw:
        raise ConfigError(f"{origin}: unknown key 'root'; remove it.")
    try:
        # YAML gives str for paths; strict mode wants Path, so convert path-typed keys first.
        return Config.model_validate({**_paths_as_path(raw, origin), "root": Path(root)})
    except ValidationError as exc:
        raise ConfigError(_one_sentence(exc, origin)) from None


def _paths_as_path(raw: dict, origin: str) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, val in (out.get("paths") or {}).items():
        if is_url(val) and key not in URL_KEYS:
            raise ConfigError(
                f"{origin}: 'paths.{key}' is {val!r}, but only paths.store and paths.naive_store "
                "may be URLs; make it a local path in params.yaml."
            )
        if isinstance(val, str):
            out["paths"][key] = StoreURL(val) if is_url(val) else Path(val)
    prep = out.get("prepare")
    if isinstance(prep, dict) and isinstance(prep.get("source"), str):
        prep["source"] = Path(prep["source"])
    train = out.get("train")
    if isinstance(train, dict) and isinstance(train.get("init"), str):
        train["init"] = Path(train["init"])
    return out


def _one_sentence(exc: ValidationError, origin: str) -> str:
    errors = exc.errors()
    # an unknown key first: a typo'd key or section also makes the real one "missing"
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    key = shown_path(".".join(str(p) for p in err["loc"]), 60)  # a key is the user's too
    if err["type"] == "extra_forbidden":
        section = err["loc"][0] if len(err["loc"]) > 1 else None
        model = (
            Config.model_fields[section].annotation if section in Config.model_fields else Config
        )
        valid = ", ".join(k for k in model.model_fields if k != "root")
        return f"{origin}: unknown key '{key}'; valid keys here are: {valid}."
    if err["type"] == "missing":
        return f"{origin}: '{key}' is missing; add it (see the project's params.yaml)."
    if err["type"] == "value_error" and len(err["loc"]) < 2:  # a section's own check: the
        # message names the keys it is about
        return f"{origin}: {err['ctx']['error']}; fix it in params.yaml."
    given = err.get("input")
    given = repr(str(given) if isinstance(given, Path) else given)
    given = given if len(given) <= 60 else f"{given[:57]}..."  # a long value is not echoed
    # a check of ours: its own words, without pydantic's "Value error, " in front
    msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
    msg = msg[0].lower() + msg[1:]
    return f"{origin}: '{key}' is {given}, but {msg}; fix it in params.yaml."
