"""Every input a user can get wrong: one sentence naming the problem and the fix, exit code 2, no
traceback, and the workspace byte for byte as it was (nothing half-written).

One table, one trained digits workspace per session (12 blocks, one deletion done), copied per
case. The CLI runs in-process through typer's CliRunner (no process start per case); the few
cases that need real argv bytes run a subprocess. Prefect's ephemeral server (which the cases
that run a flow need) starts once per session, in the background while the workspace trains.

A case that fails because of code being rewritten elsewhere (the deletion path, the journal)
stays in the table as a strict xfail naming the bug (``EXPECTED_FAILURES``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import FORGET, prepare, write_params

from obliviate.config import load_config

LONG_ID = "digits:" + "7" * 9993  # 10,000 characters
MAX_LINE = 600  # no message echoes a long user value in full


# --------------------------------------------------------------------------- the workspace


@dataclass(frozen=True)
class Template:
    ws: Path
    ids: dict[str, str]  # placeholder -> sample id: <sid> live, <forgotten> already forgotten
    groups: dict[str, list[str]]  # name -> ids: a whole block, the validation split, a class


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Template:
    """A trained digits workspace (12 blocks, no DVC) in which one sample is already forgotten."""
    import numpy as np

    from obliviate.deletion import forget
    from obliviate.partition import load_block
    from obliviate.requests import SampleIndex
    from obliviate.train import stored_training

    ws = tmp_path_factory.mktemp("bad-inputs") / "ws"
    ws.mkdir()
    cfg = load_config(write_params(ws, **FORGET))
    prepare(cfg)
    stored_training(cfg)
    gone = str(load_block(cfg.paths.blocks, 12).ids[0])
    forget(cfg, [gone])
    index = SampleIndex.of(cfg.paths.blocks)
    groups = {
        "block 5": [str(i) for i in index.ids[index.block == 5]],
        "validation": [str(i) for i in index.ids[index.block == 0]],
        "class 3": [str(i) for i in index.ids[(index.label == 3) & (index.block > 0)]],
    }
    sid = str(load_block(cfg.paths.blocks, 4).ids[0])
    assert np.isin([sid], index.ids).all()
    return Template(ws, {"<sid>": sid, "<forgotten>": gone}, groups)


@pytest.fixture(scope="session")
def prefect(tmp_path_factory):
    """Prefect's home outside the workspaces, no server URL (local, ephemeral runs), and no flow
    run heartbeats (stopping one waits up to a second per flow run). Yields the thread that
    starts the ephemeral server in the background while the template trains: join it before a
    case runs. The environment is restored afterwards."""
    import threading

    from obliviate.runtime import configure_prefect

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect")))
        mp.delenv("PREFECT_API_URL", raising=False)
        before = set(os.environ)
        configure_prefect(Path.cwd())  # the rest of its environment, before prefect is imported
        for key in set(os.environ) - before:
            mp.setenv(key, os.environ.pop(key))  # recorded as absent: removed at the end
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

        def start_server() -> None:
            with get_client(sync_client=True) as client:
                client.hello()

        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            server = threading.Thread(target=start_server, daemon=True)
            server.start()
            yield server


def snapshot(ws: Path) -> dict[str, str]:
    """sha256 of every file, except Prefect's home and the writer's OS lock file (empty; taking
    the lock creates it): what a refused command must leave as it was (tests/test_integrity.py)."""
    out = {}
    for p in sorted(ws.rglob("*")):
        rel = p.relative_to(ws).as_posix()
        if p.is_file() and not rel.startswith(".prefect/") and rel != ".obliviate/writer.lock":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir() and not rel.startswith(".prefect") and not any(p.iterdir()):
            out[rel + "/"] = "empty folder"
    return out


# --------------------------------------------------------------------------- damage


def params(**sections: dict) -> Callable[[Path, Template], None]:
    """Replace keys of params.yaml (a value None for a whole section removes it)."""

    def damage(ws: Path, t: Template) -> None:
        path = ws / "params.yaml"
        raw = yaml.safe_load(path.read_text())
        for section, values in sections.items():
            if values is None:
                raw.pop(section)
            else:
                raw[section] = {**raw.get(section, {}), **values}
        path.write_text(yaml.safe_dump(raw, sort_keys=False))

    return damage


def rename_section(old: str, new: str) -> Callable[[Path, Template], None]:
    def damage(ws: Path, t: Template) -> None:
        path = ws / "params.yaml"
        path.write_text(path.read_text().replace(f"\n{old}:", f"\n{new}:"))

    return damage


def write(rel: str, data: bytes | str) -> Callable[[Path, Template], None]:
    def damage(ws: Path, t: Template) -> None:
        path = ws / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    return damage


def lines(rel: str, group: str) -> Callable[[Path, Template], None]:
    """A JSON-lines request file naming every id of one of the template's groups."""

    def damage(ws: Path, t: Template) -> None:
        (ws / rel).write_text("".join(json.dumps(i) + "\n" for i in t.groups[group]))

    return damage


def append(rel: str, text: str) -> Callable[[Path, Template], None]:
    def damage(ws: Path, t: Template) -> None:
        with (ws / rel).open("a") as f:
            f.write(text)

    return damage


def remove(rel: str) -> Callable[[Path, Template], None]:
    def damage(ws: Path, t: Template) -> None:
        path = ws / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return damage


def flip(rel: str, at: int | None = None) -> Callable[[Path, Template], None]:
    def damage(ws: Path, t: Template) -> None:
        data = bytearray((ws / rel).read_bytes())
        data[len(data) // 2 if at is None else at] ^= 0x01
        (ws / rel).write_bytes(bytes(data))

    return damage


def truncate(rel: str, keep: int) -> Callable[[Path, Template], None]:
    def damage(ws: Path, t: Template) -> None:
        (ws / rel).write_bytes((ws / rel).read_bytes()[:keep])

    return damage


def both(*steps: Callable[[Path, Template], None]) -> Callable[[Path, Template], None]:
    def damage(ws: Path, t: Template) -> None:
        for step in steps:
            step(ws, t)

    return damage


CSV = params(prepare={"dataset": "csv", "source": "raw/table.csv"})
CSV_WITH_ID = params(prepare={"dataset": "csv", "source": "raw/table.csv", "id": "id"})
GOOD_ROWS = "".join(f"{i},{i % 3}.5,{i % 2}\n" for i in range(40))
PURCHASE_CUT = (
    "Administrative,Administrative_Duration,Informational,Informational_Duration,"
    "ProductRelated,ProductRelated_Duration,BounceRates,ExitRates,PageValues,SpecialDay,Month,"
    "OperatingSystems,Browser,Region,TrafficType,VisitorType,Weekend,Revenue\n"
    + "0,0.0,0,0.0,1,0.0,0.2,0.2,0.0,0.0,Feb,1,1,1,1,Returning_Visitor,FALSE,FALSE\n" * 30
    + "0,0.0,0,0.0,1,0.0,0.2,0.2,0.0,0.0,Feb,1,1,1,1,Return"  # cut off inside a field
)


def two_sizes(ws: Path, t: Template) -> None:
    from PIL import Image

    for cls in ("a", "b"):
        (ws / "raw" / "img" / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8 + (cls == "b" and i == 2))).save(
                ws / "raw" / "img" / "train" / cls / f"{i}.png"
            )


BLOCK = "data/blocks/block_0004.npz"
PARAMS_CHUNK = "models/store.zarr/params/c/5/0"
JOURNAL = ".obliviate/requests"
OPT_CHUNK = "models/store.zarr/optimizer/c/3/0"


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    args: tuple[str | bytes, ...]  # after `obliviate`; <sid>, <forgotten> are filled in
    words: str  # the one line must contain this
    damage: Callable[[Path, Template], None] | None = None
    params: bool = True  # append --params <ws>/params.yaml
    subprocess: bool = False  # real argv (bytes) instead of CliRunner
    fsck: bool = False  # fsck's contract: each problem a line on stdout, a count on stderr
    env: dict[str, str] = field(default_factory=dict)
    without_cuda: bool = False  # the case needs a machine without CUDA


def xfail(name: str, case: Case, reason: str):
    return pytest.param(case, id=name, marks=pytest.mark.xfail(strict=True, reason=reason))


CASES = {
    # ---- sample ids on the command line and in request files
    "non-UTF-8 id on argv (request)": Case(
        ("request", b"\xff\xfe"), "not valid UTF-8", subprocess=True
    ),
    "non-UTF-8 id on argv (forget)": Case(
        ("forget", b"digits:\xff"), "not valid UTF-8", subprocess=True
    ),
    "non-UTF-8 id (request)": Case(("request", "\udcff\udcfe"), "not valid UTF-8"),
    "non-UTF-8 id (forget)": Case(("forget", "digits:\udcff"), "not valid UTF-8"),
    "non-UTF-8 --file (request)": Case(
        ("request", "--file", "req.jsonl"), "not valid UTF-8", write("req.jsonl", b'"\xff\xfe"\n')
    ),
    "non-UTF-8 --file (forget)": Case(
        ("forget", "--file", "req.jsonl"),
        "req.jsonl:2 is not valid UTF-8",
        write("req.jsonl", b'"digits:1"\n"a\xff"\n'),
    ),
    "non-UTF-8 id escaped in --file": Case(
        ("request", "--file", "req.jsonl"), "not valid UTF-8", write("req.jsonl", '"\\udcff"\n')
    ),
    "10,000-character id (forget)": Case(("forget", LONG_ID), "(10000 characters)"),
    "10,000-character id (request)": Case(("request", LONG_ID), "(10000 characters)"),
    "10,000-character id in --file": Case(
        ("request", "--file", "req.jsonl"),
        "(10000 characters)",
        write("req.jsonl", json.dumps(LONG_ID) + "\n"),
    ),
    "id ending in a newline": Case(("request", "digits:5\n"), r"digits:5\n"),
    "empty id (request)": Case(("request", ""), "empty sample id"),
    "empty id (forget)": Case(("forget", "<sid>", ""), "empty sample id"),
    "blank id in --file": Case(
        ("request", "--file", "req.jsonl"), "has no sample id", write("req.jsonl", '"  "\n')
    ),
    "duplicated id (forget)": Case(("forget", "<sid>", "<sid>"), "repeats"),
    "duplicated id (request)": Case(("request", "<sid>", "<sid>"), "repeats"),
    "unknown id (forget)": Case(("forget", "digits:99999"), "unknown sample id"),
    "unknown id (request)": Case(("request", "digits:99999"), "unknown sample id"),
    "already forgotten id (forget)": Case(("forget", "<forgotten>"), "already forgotten"),
    "already forgotten id (request)": Case(("request", "<forgotten>"), "already forgotten"),
    "no ids (forget)": Case(("forget",), "name the sample ids"),
    "no ids (request)": Case(("request",), "names no sample ids"),
    "--file missing": Case(("forget", "--file", "nope.jsonl"), "does not exist"),
    "--file name too long": Case(("request", "--file", "r" * 5000), "File name too long"),
    "--file a folder": Case(("request", "--file", "data"), "not a file"),
    "--file empty": Case(
        ("request", "--file", "req.jsonl"), "holds no sample ids", write("req.jsonl", "")
    ),
    "--file malformed JSON line": Case(
        ("forget", "--file", "req.jsonl"),
        "req.jsonl:2 is not valid JSON",
        write("req.jsonl", '"digits:1"\n{"id": "digits:2"\n'),
    ),
    "--file id neither text nor an integer": Case(
        ("request", "--file", "req.jsonl"),
        "req.jsonl:1 has no sample id",
        write("req.jsonl", '{"id": 1.5}\n'),
    ),
    "empties a block": Case(
        ("request", "--file", "req.jsonl"),
        "would empty block(s) [5]",
        lines("req.jsonl", "block 5"),
    ),
    "empties the validation split": Case(
        ("forget", "--file", "req.jsonl"),
        "would empty the validation split",
        lines("req.jsonl", "validation"),
    ),
    "removes a whole class": Case(
        ("request", "--file", "req.jsonl"),
        "every sample of class(es) [3]",
        lines("req.jsonl", "class 3"),
    ),
    "request with a remote store": Case(
        ("request", "<sid>"), "s3://", params(paths={"store": "s3://bucket/store.zarr"})
    ),
    # ---- status, ids, export, retrain: bad arguments
    "status of an unknown request": Case(
        ("status", "req-20990101T000000-abcdef"), "no deletion request"
    ),
    "status of a path as request id": Case(("status", "../../params"), "no deletion request"),
    "status of a request id with a newline": Case(("status", "req-1\n"), r"req-1\n"),
    "status of a 10,000-character request id": Case(("status", LONG_ID), "(10000 characters)"),
    "ids --block 0": Case(("ids", "--block", "0"), "choose --block 1..12"),
    "ids --block 99": Case(("ids", "--block", "99"), "choose --block 1..12"),
    "ids --block not a number": Case(("ids", "--block", "two"), "'--block'"),
    "export --row 99": Case(("export", "-o", "m.safetensors", "--row", "99"), "choose 0..12"),
    "export --row -1": Case(("export", "-o", "m.safetensors", "--row", "-1"), "choose 0..12"),
    "export --row not a number": Case(("export", "-o", "m.safetensors", "--row", "x"), "'--row'"),
    "export --format onnx": Case(
        ("export", "-o", "m.onnx", "--format", "onnx"), "use safetensors or pt"
    ),
    "export -o under a file": Case(("export", "-o", "params.yaml/m.safetensors"), "cannot write"),
    "export -o a folder": Case(("export", "-o", "data"), "cannot write"),
    "export without -o": Case(("export",), "'--output'"),
    "export -o name too long": Case(("export", "-o", "m" * 300 + ".safetensors"), "too long"),
    "export -o where nothing can be written": Case(
        ("export", "-o", "/proc/obliviate/m.pt", "--format", "pt"), "cannot write /proc/obliviate"
    ),
    "retrain without --naive": Case(("retrain",), "obliviate retrain --naive"),
    "unknown command": Case(("frobnicate",), "No such command", params=False),
    "unknown option": Case(("forget", "--forse", "<sid>"), "--forse"),
    # ---- serve
    "serve --cron out of range": Case(("serve", "--cron", "61 * * * *"), "with valid values"),
    "serve --cron empty": Case(("serve", "--cron", ""), "5-field cron"),
    "serve --cron 4 fields": Case(("serve", "--cron", "* * * *"), "5-field cron"),
    "serve --cron 6 fields": Case(("serve", "--cron", "0 0 * * * *"), "5-field cron"),
    "serve --cron refused before the server": Case(
        ("serve", "--cron", "61 * * * *"),
        "with valid values",
        env={"PREFECT_API_URL": "http://127.0.0.1:9/api"},
    ),
    "serve.cron invalid in params.yaml": Case(
        ("serve",), "serve.cron", params(serve={"cron": "* * 32 * *"})
    ),
    "serve without a Prefect server": Case(("serve",), "needs a Prefect server"),
    # ---- params.yaml
    "params.yaml name too long": Case(
        ("info", "--params", "p" * 5000), "File name too long", params=False
    ),
    "params.yaml path not UTF-8 on argv": Case(
        ("info", "--params", b"\xff.yaml"), "does not exist", params=False, subprocess=True
    ),
    "params.yaml missing": Case(("info", "--params", "nope.yaml"), "does not exist", params=False),
    "params.yaml a folder": Case(("info", "--params", "data"), "not a file", params=False),
    "params.yaml not YAML": Case(("info",), "not valid YAML", write("params.yaml", "paths: [\n")),
    "params.yaml not UTF-8": Case(
        ("info",), "not valid UTF-8", write("params.yaml", b"paths:\n  blocks: \xff\n")
    ),
    "params.yaml empty": Case(("info",), "'paths' is missing", write("params.yaml", "")),
    "params.yaml a list": Case(("info",), "must be a mapping", write("params.yaml", "- a\n- b\n")),
    "unknown key": Case(("info",), "unknown key 'train.epochz'", params(train={"epochz": 1})),
    "typo'd section": Case(("info",), "unknown key 'trian'", rename_section("train", "trian")),
    "missing section": Case(("info",), "'forget' is missing", params(forget=None)),
    "consolidate section missing": Case(
        ("forget", "<sid>"), "'consolidate' is missing", params(consolidate=None)
    ),
    "deadline not an age": Case(
        ("consolidate",),
        "'consolidate.max_age' is 'soon'",
        params(consolidate={"max_age": "soon"}),
    ),
    "deadline shorter than the schedule": Case(
        ("consolidate",),
        "runs up to 168 h apart, longer than consolidate.max_age 36h",
        params(consolidate={"cron": "0 3 * * 1"}),
    ),
    "refusal policy unknown": Case(
        ("forget", "<sid>"),
        "'forget.on_refusal' is 'retry'",
        params(forget={"on_refusal": "retry"}),
    ),
    "replay without a choice": Case(("replay",), "choose what to replay"),
    "replay of a row past B": Case(("replay", "--row", "99"), "row 99 is not a row of"),
    "wrong type": Case(("info",), "'train.epochs' is 'five'", params(train={"epochs": "five"})),
    "negative blocks": Case(
        ("partition",), "'prepare.blocks' is -3", params(prepare={"blocks": -3})
    ),
    "epsilon zero": Case(
        ("forget", "<sid>"), "'forget.epsilon' is 0", params(forget={"epsilon": 0})
    ),
    "epsilon negative": Case(
        ("info",), "'forget.epsilon' is -0.1", params(forget={"epsilon": -0.1})
    ),
    "max_accuracy_drop negative": Case(
        ("forget", "<sid>"),
        "'forget.max_accuracy_drop' is -0.01",
        params(forget={"max_accuracy_drop": -0.01}),
    ),
    "max_blocks below min_blocks": Case(
        ("info",), "at least forget.min_blocks", params(forget={"max_blocks": 2})
    ),
    "guard without a validation split": Case(
        ("info",), "needs a validation split", params(prepare={"val_fraction": 0.0})
    ),
    "unknown model": Case(
        ("train",), "'train.model' is 'lenet6'", params(train={"model": "lenet6"})
    ),
    "unknown torchvision model": Case(
        ("evaluate",), "nosuchnet", params(train={"model": "torchvision:nosuchnet"})
    ),
    "model import path not found": Case(
        ("export", "-o", "m.pt", "--format", "pt"),
        "nosuchpkg",
        params(train={"model": "nosuchpkg.nets:build"}),
    ),
    "unknown dataset": Case(
        ("partition",), "'prepare.dataset' is 'cifar100'", params(prepare={"dataset": "cifar100"})
    ),
    "unknown optimizer": Case(
        ("train",), "'train.optimizer' is 'adamm'", params(train={"optimizer": "adamm"})
    ),
    "bad device name": Case(
        ("evaluate",), "'evaluate.device' is 'gpu'", params(evaluate={"device": "gpu"})
    ),
    "device cuda without CUDA": Case(
        ("evaluate",), "cuda", params(evaluate={"device": "cuda"}), without_cuda=True
    ),
    "10,000-character value in params.yaml": Case(
        ("info",), "'train.model' is 'xxx", params(train={"model": "x" * 10000})
    ),
    "10,000-character key in params.yaml": Case(
        ("info",), "unknown key '...kkk", params(train={"k" * 10000: 1})
    ),
    "lr negative": Case(("info",), "'train.lr' is -0.001", params(train={"lr": -0.001})),
    "threads zero": Case(("info",), "'train.threads' is 0", params(train={"threads": 0})),
    "device cuda:99": Case(("evaluate",), "cuda:99", params(evaluate={"device": "cuda:99"})),
    "verify.owner_samples 1.5": Case(
        ("verify",), "verify.owner_samples", params(verify={"owner_samples": 1.5})
    ),
    "verify.patch_corner typo": Case(
        ("verify",), "verify.patch_corner", params(verify={"patch_corner": "bottom-rigth"})
    ),
    "paths.blocks a URL": Case(
        ("info",),
        "only paths.store and paths.naive_store may be URLs",
        params(paths={"blocks": "s3://bucket/blocks"}),
    ),
    "prepare.source set for digits": Case(
        ("partition",), "must be null", params(prepare={"source": "raw/digits.csv"})
    ),
    "prepare.id set for digits": Case(
        ("partition",), "only csv and parquet have columns", params(prepare={"id": "id"})
    ),
    "train.init missing file": Case(
        ("train", "--overwrite"), "init.safetensors", params(train={"init": "init.safetensors"})
    ),
    "train.init garbage": Case(
        ("train", "--overwrite"),
        "init.safetensors",
        both(params(train={"init": "init.safetensors"}), write("init.safetensors", b"\x00junk")),
    ),
    "store built with other params (train)": Case(
        ("train",), "--overwrite", params(train={"lr": 0.002})
    ),
    "store built with other params (forget)": Case(
        ("forget", "<sid>"), "other params", params(train={"lr": 0.002})
    ),
    "store built for another model (evaluate)": Case(
        ("evaluate",), "another architecture", params(train={"model": "mlp"})
    ),
    "store built for another model (export)": Case(
        ("export", "-o", "m.safetensors"), "another architecture", params(train={"model": "mlp"})
    ),
    # ---- csv sources (obliviate partition)
    "csv missing": Case(("partition",), "is missing", CSV),
    "csv empty": Case(
        ("partition",), "cannot be read as csv", both(CSV, write("raw/table.csv", ""))
    ),
    "csv header only": Case(
        ("partition",), "has no rows", both(CSV, write("raw/table.csv", "a,b,label\n"))
    ),
    "csv cut inside a quoted field": Case(
        ("partition",),
        "cannot be read as csv",
        both(CSV, write("raw/table.csv", "a,b,label\n" + GOOD_ROWS + '41,"2.5,1\n42,3')),
    ),
    "csv binary garbage": Case(
        ("partition",),
        "table.csv",
        both(CSV, write("raw/table.csv", bytes(range(256)) * 8)),
    ),
    "csv missing label column": Case(
        ("partition",),
        "no column 'label'",
        both(CSV, write("raw/table.csv", "a,b,c\n" + GOOD_ROWS)),
    ),
    "csv garbage in a numeric column": Case(
        ("partition",),
        "numeric column 'b' holds 'n/a?'",
        both(CSV, write("raw/table.csv", "a,b,label\n" + GOOD_ROWS + "40,n/a?,1\n")),
    ),
    "csv duplicate ids": Case(
        ("partition",),
        "duplicated id",
        both(CSV_WITH_ID, write("raw/table.csv", "id,b,label\n" + GOOD_ROWS + "3,1.0,1\n")),
    ),
    "csv empty id": Case(
        ("partition",),
        "the id column 'id' is empty at row 4",
        both(
            CSV_WITH_ID, write("raw/table.csv", 'id,b,label\n"a",1,0\n"b",2,1\n"c",1,0\n" ",2,1\n')
        ),
    ),
    "csv id with a line break": Case(
        ("partition",),
        "holds a line break or other control character",
        both(CSV_WITH_ID, write("raw/table.csv", 'id,b,label\n"a",1,0\n"b\nc",2,1\n')),
    ),
    "csv id over 256 characters": Case(
        ("partition",),
        "is 300 characters long, over the 256 allowed",
        both(CSV_WITH_ID, write("raw/table.csv", f"id,b,label\na,1,0\n{'x' * 300},2,1\n")),
    ),
    "purchase CSV cut inside a field": Case(
        ("partition",),
        "online_shoppers_intention.csv",
        both(
            params(prepare={"dataset": "purchase", "source": "raw/online_shoppers_intention.csv"}),
            write("raw/online_shoppers_intention.csv", PURCHASE_CUT),
        ),
    ),
    "images of two sizes": Case(
        ("partition",),
        "differ in size (8x8 and 9x8, height x width); set train.image_size",
        both(params(prepare={"dataset": "imagefolder", "source": "raw/img"}), two_sizes),
    ),
    "csv missing labels": Case(
        ("partition",),
        "missing value",
        both(CSV, write("raw/table.csv", "a,b,label\n" + GOOD_ROWS + "40,1.5,\n")),
    ),
    "csv not UTF-8": Case(
        ("partition",),
        "table.csv",
        both(CSV, write("raw/table.csv", b"a,b,label\n" + GOOD_ROWS.encode() + b"\xff\xfe,1,0\n")),
    ),
    "csv feature column missing": Case(
        ("partition",),
        "no column 'zz' (prepare.features)",
        both(
            params(prepare={"dataset": "csv", "source": "raw/table.csv", "features": ["a", "zz"]}),
            write("raw/table.csv", "a,b,label\n" + GOOD_ROWS),
        ),
    ),
    "parquet source that is a CSV": Case(
        ("partition",),
        "cannot be read as parquet",
        both(
            params(prepare={"dataset": "parquet", "source": "raw/table.parquet"}),
            write("raw/table.parquet", "a,b,label\n" + GOOD_ROWS),
        ),
    ),
    "npz source not an archive": Case(
        ("partition",),
        "not a readable .npz archive",
        both(
            params(prepare={"dataset": "npz", "source": "raw/data.npz"}),
            write("raw/data.npz", b"PK\x03\x04 not really"),
        ),
    ),
    "imagefolder without train/": Case(
        ("partition",),
        "train is missing",
        both(
            params(prepare={"dataset": "imagefolder", "source": "raw/images"}),
            write("raw/images/readme.txt", "no images here"),
        ),
    ),
    "too many blocks for the data": Case(
        ("partition",), "lower prepare.blocks", params(prepare={"blocks": 5000})
    ),
    # ---- damaged workspace
    "test set truncated": Case(("evaluate",), "test.npz", truncate("data/test.npz", 500)),
    "test set corrupt": Case(("evaluate",), "test.npz cannot be read", flip("data/test.npz")),
    "test set missing": Case(("evaluate",), "test.npz is missing", remove("data/test.npz")),
    "block deleted (forget)": Case(("forget", "<sid>"), "block_0004.npz is missing", remove(BLOCK)),
    "block deleted (evaluate)": Case(("evaluate",), "block_0004.npz is missing", remove(BLOCK)),
    "block deleted (ids)": Case(
        ("ids", "--block", "4"), "block_0004.npz is missing", remove(BLOCK)
    ),
    "block deleted (fsck)": Case(("fsck",), "block_0004.npz is missing", remove(BLOCK), fsck=True),
    "block corrupt (forget)": Case(
        ("forget", "<sid>"), "does not match its sha256", flip(BLOCK, at=-300)
    ),
    "block corrupt (evaluate)": Case(
        ("evaluate",), "does not match its sha256", flip(BLOCK, at=-300)
    ),
    "block corrupt (ids)": Case(
        ("ids", "--block", "4"), "does not match its sha256", flip(BLOCK, at=-300)
    ),
    "block corrupt (fsck)": Case(
        ("fsck",), "does not match its sha256", flip(BLOCK, at=-300), fsck=True
    ),
    "manifest missing": Case(
        ("ids", "--block", "1"), "manifest.json is missing", remove("data/blocks/manifest.json")
    ),
    "manifest garbage": Case(
        ("ids", "--block", "1"),
        "not a block manifest",
        write("data/blocks/manifest.json", b"\x00\xff{"),
    ),
    "store missing (info)": Case(
        ("info",), "run `obliviate train` first", remove("models/store.zarr")
    ),
    "store missing (export)": Case(
        ("export", "-o", "m.safetensors"), "run `obliviate train`", remove("models/store.zarr")
    ),
    "store missing (forget)": Case(
        ("forget", "<sid>"), "run `obliviate train`", remove("models/store.zarr")
    ),
    "chunk corrupt (evaluate)": Case(
        ("evaluate",), "row 5 of params is corrupt", flip(PARAMS_CHUNK)
    ),
    "chunk corrupt (export)": Case(
        ("export", "-o", "m.pt", "--format", "pt", "--row", "5"),
        "row 5 of params is corrupt",
        flip(PARAMS_CHUNK),
    ),
    "chunk corrupt (forget)": Case(
        ("forget", "<sid>"), "row 5 of params is corrupt", flip(PARAMS_CHUNK)
    ),
    "chunk corrupt (fsck)": Case(
        ("fsck",), "row 5 of params is corrupt", flip(PARAMS_CHUNK), fsck=True
    ),
    "chunk missing (evaluate)": Case(
        ("evaluate",), "row 3 of optimizer has a missing chunk", remove(OPT_CHUNK)
    ),
    "chunk missing (fsck)": Case(
        ("fsck",), "row 3 of optimizer has a missing chunk", remove(OPT_CHUNK), fsck=True
    ),
    "request file torn (status)": Case(
        ("status",),
        "req-20990101T000000-abcdef.json",
        write(f"{JOURNAL}/req-20990101T000000-abcdef.json", "{torn"),
    ),
    "request file torn (drain)": Case(
        ("drain",),
        "req-20990101T000000-abcdef.json",
        write(f"{JOURNAL}/req-20990101T000000-abcdef.json", "{torn"),
    ),
    "audit trail torn": Case(
        ("audit",),
        "deletions.jsonl:2 is not an audit record",
        both(truncate("audit/deletions.jsonl", 10**6), append("audit/deletions.jsonl", "{torn\n")),
    ),
}


# Cases that fail because of code other engineers are rewriting: name -> the bug.
EXPECTED_FAILURES: dict[str, str] = {}


def _cases():
    for name, case in CASES.items():
        why = EXPECTED_FAILURES.get(name)
        yield xfail(name, case, why) if why else pytest.param(case, id=name)


# --------------------------------------------------------------------------- the test


def _fill(arg: str | bytes, t: Template) -> str | bytes:
    if isinstance(arg, bytes):
        return arg
    for key, sid in t.ids.items():
        arg = arg.replace(key, sid)
    return arg


def _run_subprocess(ws: Path, args: list, env: dict) -> tuple[int, str, str]:
    full = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | env
    r = subprocess.run(
        [sys.executable.encode(), b"-m", b"obliviate.cli",
         *(a if isinstance(a, bytes) else a.encode() for a in args)],
        cwd=ws, env=full, capture_output=True, timeout=300,
    )  # fmt: skip
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def _run_in_process(ws: Path, args: list, env: dict, monkeypatch) -> tuple[int, str, str]:
    import traceback

    from typer.testing import CliRunner

    from obliviate.cli import app

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ws)
    r = CliRunner().invoke(app, args)
    err = r.stderr
    if r.exc_info and not isinstance(r.exception, SystemExit):
        err += "".join(traceback.format_exception(*r.exc_info))
    return r.exit_code, r.stdout, err


@pytest.mark.parametrize("case", list(_cases()))
def test_bad_input_is_one_sentence_exit_2_and_changes_nothing(
    case: Case, prefect, template: Template, tmp_path, monkeypatch, capfd
):
    if case.without_cuda:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    prefect.join()  # the ephemeral server is up (the first case waits for it)
    ws = tmp_path / "ws"
    shutil.copytree(template.ws, ws)
    if case.damage:
        case.damage(ws, template)
    args = [_fill(a, template) for a in case.args]
    if case.params:
        args += ["--params", str(ws / "params.yaml")]
    before = snapshot(ws)
    if case.subprocess:
        code, out, err = _run_subprocess(ws, args, case.env)
    else:
        code, out, err = _run_in_process(ws, args, case.env, monkeypatch)
    leaked = capfd.readouterr()  # anything written past CliRunner (logging handlers, C code)
    everything = out + err + leaked.out + leaked.err
    assert code == 2, (code, out, err)
    assert "Traceback" not in everything, everything
    assert not (leaked.out + leaked.err).strip(), leaked
    if case.fsck:  # each problem a line on stdout, their count on stderr
        said = out.strip()
        assert err.strip().startswith("fsck: 1 problem(s)"), err
    else:
        assert not out.strip(), out
        said = err.strip()
    assert said and "\n" not in said, said
    assert case.words in said, said
    assert len(said) <= MAX_LINE, said[:MAX_LINE]
    assert snapshot(ws) == before
