"""The parameter store and the DVC remote on S3-compatible object storage.

A moto server on 127.0.0.1 stands in for S3; the code under test finds it the way it finds any
S3 endpoint, through the environment botocore reads (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass

import boto3
import numpy as np
import pytest
import zarr
from conftest import SMALL, Interrupted, crash_after, prepare, write_params
from moto.server import ThreadedMotoServer

from obliviate.config import load_config
from obliviate.errors import ConfigError, StoreError
from obliviate.evaluate import evaluate_store
from obliviate.objectstore import StoreURL
from obliviate.partition import load_block
from obliviate.store import ParamStore
from obliviate.train import stored_training


@dataclass
class S3:
    endpoint: str
    bucket: str

    def keys(self, prefix: str) -> list[str]:
        listing = boto3.client("s3").list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for o in listing.get("Contents", [])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path) -> S3:
    """A fresh bucket on the loopback server; only the environment says where it is."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # never look for instance credentials
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = f"obliviate-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return S3(s3_server, bucket)


def bits(a) -> np.ndarray:
    return np.asarray(a).view(np.uint32)


def s3_config(local_cfg, url: str):
    return load_config(local_cfg.root / "params.yaml", paths={"store": url})


# --------------------------------------------------------------------------- config


def test_a_store_url_stays_a_url_and_local_paths_stay_paths(tmp_path):
    url = "s3://bucket/models/store.zarr"
    cfg = load_config(write_params(tmp_path, paths={"store": url}))
    assert isinstance(cfg.paths.store, StoreURL) and cfg.paths.store == url
    assert cfg.paths.store / "zarr.json" == f"{url}/zarr.json"
    assert cfg.paths.store.name == "store.zarr"
    assert cfg.paths.naive_store == tmp_path / "models" / "naive.zarr"
    assert type(cfg.paths.naive_store) is type(tmp_path)
    assert cfg.paths.model_dump(mode="json")["store"] == url
    with pytest.raises(ConfigError, match=r"'paths.blocks' is 's3://bucket/blocks'.*local path"):
        load_config(write_params(tmp_path, paths={"blocks": "s3://bucket/blocks"}))


# --------------------------------------------------------------------------- the store


def test_stored_training_on_s3_matches_a_local_store_and_resumes(tmp_path, s3, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL mistaken for a path would land here, as s3:/...
    local_cfg = load_config(write_params(tmp_path, **SMALL))
    prepare(local_cfg)
    local = stored_training(local_cfg)
    url = f"s3://{s3.bucket}/store.zarr"
    cfg = s3_config(local_cfg, url)
    B = cfg.prepare.blocks

    remote = stored_training(cfg)
    assert remote.is_remote and remote.completed == B
    assert "store.zarr/params/zarr.json" in s3.keys("store.zarr/")
    group = zarr.open_group(url, mode="r", storage_options={"endpoint_url": s3.endpoint})
    params = group["params"]
    assert params.shape == (B + 1, local.params.shape[1])
    assert params.attrs["obliviate"]["completed"] == B
    assert np.array_equal(bits(params[:]), bits(local.params[:]))
    assert np.array_equal(bits(group["optimizer"][:]), bits(local.optimizer[:]))
    assert remote.nbytes_stored() == local.nbytes_stored() > 0
    assert evaluate_store(cfg)["accuracy"] == evaluate_store(local_cfg)["accuracy"]

    # --overwrite deletes the old objects; a crash after block 3 leaves a store that resumes
    boto3.client("s3").put_object(Bucket=s3.bucket, Key="store.zarr/stray", Body=b"x")

    with pytest.raises(Interrupted):
        stored_training(cfg, overwrite=True, on_block=crash_after(3))
    assert "store.zarr/stray" not in s3.keys("store.zarr/")
    interrupted = ParamStore.open(url)
    assert interrupted.completed == 3
    assert not interrupted.params[4:].any()  # rows past the crash were never written
    resumed = stored_training(cfg)
    assert resumed.completed == B
    assert np.array_equal(bits(resumed.params[:]), bits(local.params[:]))
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())


def test_a_deletion_refuses_an_s3_store_and_closes_its_request(tmp_path, s3):
    from obliviate import lifecycle
    from obliviate.deletion import forget

    local_cfg = load_config(write_params(tmp_path, **SMALL))
    prepare(local_cfg)
    cfg = s3_config(local_cfg, f"s3://{s3.bucket}/store.zarr")
    before = stored_training(cfg).params[:]
    sid = str(load_block(cfg.paths.blocks, 2).ids[0])
    with pytest.raises(StoreError, match=r"on object storage.*local store"):
        forget(cfg, [sid])
    assert lifecycle.entries(cfg) == []  # refused, nothing queued or left for recovery
    assert np.array_equal(bits(ParamStore.open(cfg.paths.store).params[:]), bits(before))
    assert sid in set(load_block(cfg.paths.blocks, 2).ids)


# --------------------------------------------------------------------------- the DVC remote


def test_dvc_push_to_an_s3_remote_and_pull_back(tmp_path, s3):
    repo = tmp_path / "repo"
    repo.mkdir()

    def run(*cmd: str) -> None:
        env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_NOSYSTEM": "1"}
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr or done.stdout}"

    def dvc(*args: str) -> None:
        run(sys.executable, "-m", "dvc", *args)

    data = repo / "data"
    data.mkdir()
    files = {"a.bin": np.random.default_rng(0).bytes(50_000), "b.txt": b"forget me not\n"}
    for name, content in files.items():
        (data / name).write_bytes(content)
    run("git", "init", "-q")
    dvc("init", "-q")
    dvc("add", "-q", "data")
    dvc("remote", "add", "-d", "s3", f"s3://{s3.bucket}/dvc")
    dvc("remote", "modify", "s3", "endpointurl", s3.endpoint)
    dvc("push", "-q")
    assert len(s3.keys("dvc/files/md5/")) == len(files) + 1  # the files and the .dir listing

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(data)
    dvc("pull", "-q")
    assert {p.name: p.read_bytes() for p in data.iterdir()} == files


def unique_sample(cfg, block: int) -> tuple[str, bytes]:
    """A sample of ``block`` whose pixel bytes occur in no other sample (digits has duplicates)."""
    seen: dict[bytes, int] = {}
    for k in range(cfg.prepare.blocks + 1):
        for x in load_block(cfg.paths.blocks, k).x:
            seen[x.tobytes()] = seen.get(x.tobytes(), 0) + 1
    b = load_block(cfg.paths.blocks, block)
    return next((str(i), x.tobytes()) for i, x in zip(b.ids, b.x, strict=True)
                if seen[x.tobytes()] == 1)  # fmt: skip


def bucket_objects(s3: S3, prefix: str) -> dict[str, bytes]:
    client = boto3.client("s3")
    return {k: client.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in s3.keys(prefix)}


def holders(objects: dict[str, bytes], content: bytes) -> list[str]:
    return [k for k, body in objects.items() if content in body]


@pytest.mark.slow
def test_a_deletion_purges_an_s3_remote_and_an_unreachable_one_later(
    trained, s3, monkeypatch, tmp_path_factory
):
    from conftest import GIT, dvc_workspace

    from obliviate.deletion import forget, recover
    from obliviate.transaction import State
    from obliviate.versioning import md5s_in_use

    cfg = dvc_workspace(trained)
    ws = cfg.root

    def dvc(*args: str) -> str:
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        cmd = [sys.executable, "-m", "dvc", *args]
        done = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stderr or done.stdout}"
        return done.stdout

    dvc("remote", "add", "-d", "s3", f"s3://{s3.bucket}/dvc")
    dvc("remote", "modify", "s3", "endpointurl", s3.endpoint)
    dvc("push", "-q")
    sid, content = unique_sample(cfg, 4)
    before = bucket_objects(s3, "dvc/")
    assert holders(before, content)  # pushed: the old block holds the sample

    record = forget(cfg, [sid], refresh=False)
    assert record["remote_purge"] == "done" and record["purged_remote_objects"] > 0
    after = bucket_objects(s3, "dvc/")
    assert holders(after, content) == []  # no byte of the sample left on the remote
    current = {k for k in before if k.replace("dvc/files/md5/", "").replace("/", "")
               in md5s_in_use(ws)}  # fmt: skip
    assert current and current <= set(after)  # what the new version still uses stays

    # the remote cannot be reached: the deletion commits all the same, the purge waits
    dvc("push", "-q")
    sid2, content2 = unique_sample(cfg, 9)
    dvc("remote", "modify", "s3", "endpointurl", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail fast
    record = forget(cfg, [sid2], refresh=False)
    assert record["remote_purge"] == "pending"
    assert "could not be purged" in record["remote_purge_error"]
    assert (cfg.paths.state / "remote_purge.json").is_file()
    assert holders(bucket_objects(s3, "dvc/"), content2)  # still there, for now
    assert "up to date" in dvc("status")  # the local state is the new version
    dvc("remote", "modify", "s3", "endpointurl", s3.endpoint)
    with State.of(cfg).lock():
        assert recover(cfg) == ([], [])  # nothing to finish but the pending purge
    assert not (cfg.paths.state / "remote_purge.json").exists()
    assert holders(bucket_objects(s3, "dvc/"), content2) == []

    # the remote still serves the current version: a fresh clone pulls it
    dvc("push", "-q")
    assert "in sync" in dvc("status", "-c")
    subprocess.run(["git", "add", ".dvc/config"], cwd=ws, check=True)
    subprocess.run([*GIT, "commit", "-qm", "remote"], cwd=ws, check=True)
    clone = tmp_path_factory.mktemp("clone") / "ws"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    pull = subprocess.run([sys.executable, "-m", "dvc", "pull", "-q"], cwd=clone,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"}, capture_output=True,
                          text=True)  # fmt: skip
    assert pull.returncode == 0, pull.stderr
    blocks = sorted(cfg.paths.blocks.glob("*.npz"))
    rel = cfg.paths.blocks.relative_to(ws)
    assert [(clone / rel / b.name).read_bytes() for b in blocks] == [b.read_bytes() for b in blocks]
