"""Any model (torchvision:, import paths, a pretrained start) trains, forgets and replays exactly;
the device check; the export, read back by a process that never imports obliviate."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT, prepare, write_params

from obliviate.compat import require_same_device, store_fingerprint
from obliviate.config import load_config
from obliviate.deletion import forget
from obliviate.errors import ConfigError, StoreError
from obliviate.evaluate import evaluate_store
from obliviate.partition import load_block
from obliviate.store import ParamStore
from obliviate.train import Trainer, stored_training

TINY = {
    "prepare": {"blocks": 4},
    "train": {"epochs": 1, "batch_size": 32},
    "forget": {"min_blocks": 2, "max_blocks": 4, "max_accuracy_drop": None},
}


def workspace(folder, **train) -> object:
    cfg = load_config(write_params(folder, **{**TINY, "train": {**TINY["train"], **train}}))
    prepare(cfg)
    return cfg


def forget_and_check_replay(cfg) -> dict:
    """Forget one sample of block 2, then replay every row up to the stop block from its
    stored predecessor: bit for bit, parameters and optimizer state."""
    stored_training(cfg)
    record = forget(cfg, [str(load_block(cfg.paths.blocks, 2).ids[3])], force=True)
    store = ParamStore.open(cfg.paths.store)
    trainer = Trainer.from_config(cfg)
    for k in range(1, record["stop_block"] + 1):
        theta, opt = trainer.run_block(k, *store.read(k - 1))
        want_theta, want_opt = store.read(k)
        assert np.array_equal(theta.numpy().view(np.uint32), want_theta.view(np.uint32)), k
        assert np.array_equal(opt.numpy().view(np.uint32), want_opt.view(np.uint32)), k
    return record


def test_import_path_model_with_batchnorm_trains_forgets_and_replays(tmp_path):
    cfg = workspace(tmp_path, model="toy_models:tiny_cnn", model_args={"width": 6})
    forget_and_check_replay(cfg)
    arch = ParamStore.open(cfg.paths.store).meta["extra"]["architecture"]
    assert arch["kind"] == "import" and arch["model_args"] == {"width": 6}
    assert "BatchNorm2d(6" in arch["modules"]
    names = [e["name"] for e in ParamStore.open(cfg.paths.store).meta["layout"]]
    assert "1.running_mean" in names and "1.num_batches_tracked" not in names


def test_pretrained_init_is_p0_and_its_digest_is_fingerprinted(tmp_path):
    from safetensors.torch import save_file

    from obliviate.models import build_model

    torch.manual_seed(123)
    pre = build_model("lenet5", (1, 8, 8), 10)
    init = tmp_path / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in pre.state_dict().items()}, str(init))
    cfg = workspace(tmp_path, init="pretrained.safetensors")
    before = store_fingerprint(cfg)
    forget_and_check_replay(cfg)
    store = ParamStore.open(cfg.paths.store)
    p0 = torch.cat([v.reshape(-1) for v in pre.state_dict().values()]).numpy()
    assert np.array_equal(store.read(0)[0], p0)
    torch.manual_seed(7)  # other weights under the same file name: another fingerprint
    other = build_model("lenet5", (1, 8, 8), 10)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(init))
    assert store_fingerprint(cfg) != before
    with pytest.raises(StoreError, match="built with other params"):
        stored_training(cfg)


def test_replay_on_another_device_class_is_refused_unless_inexact_allowed(tmp_path):
    cfg = workspace(tmp_path)
    store = stored_training(cfg)
    meta = store.meta
    assert meta["extra"]["device"]["class"] == "cpu"
    assert meta["extra"]["device"]["torch"] == torch.__version__
    elsewhere = {**meta["extra"]["device"], "class": "NVIDIA H200"}
    store.params.attrs["obliviate"] = {**meta, "extra": {**meta["extra"], "device": elsewhere}}
    trainer = Trainer.from_config(cfg)
    with pytest.raises(StoreError, match=r"trained on NVIDIA H200.*runs? on cpu.*--allow-inexact"):
        require_same_device(ParamStore.open(cfg.paths.store), trainer, allow_inexact=False)
    record = require_same_device(ParamStore.open(cfg.paths.store), trainer, allow_inexact=True)
    assert record["row"] == 1 and record["max_abs_diff"] == 0.0  # really the same CPU here
    replays = ParamStore.open(cfg.paths.store).meta["extra"]["inexact_replays"]
    assert replays == [record]
    # obliviate train's resume path refuses too (a store missing its last rows)
    store = ParamStore.open(cfg.paths.store)
    store.params.attrs["obliviate"] = {**store.meta, "completed": 2}
    with pytest.raises(StoreError, match="--allow-inexact"):
        stored_training(cfg)
    assert stored_training(cfg, allow_inexact=True).completed == cfg.prepare.blocks


def test_cuda_device_without_cuda_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = workspace(tmp_path, device="cuda")
    with pytest.raises(ConfigError, match=r"train\.device is cuda.*set train\.device: auto"):
        stored_training(cfg)
    assert not cfg.paths.store.exists()


def test_bf16_autocast_replays_exactly_on_cpu(tmp_path):
    cfg = workspace(tmp_path, precision="bf16")
    store = stored_training(cfg)
    trainer = Trainer.from_config(cfg)
    theta, _ = trainer.run_block(2, *store.read(1))
    assert np.array_equal(theta.numpy(), store.read(2)[0])


# --------------------------------------------------------------------------- torchvision + export

FOREIGN_READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, torchvision
    from safetensors.torch import load_file

    weights, test_npz = sys.argv[1], sys.argv[2]
    side = json.load(open(weights + ".json"))
    arch, pre = side["architecture"], side["preprocessing"]
    name = arch["model"].split(":", 1)[1]
    model = torchvision.models.get_model(name, weights=None, num_classes=arch["n_classes"],
                                         **arch["model_args"])
    first = next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    parent_name, _, attr = first[0].rpartition(".")
    conv = first[1]
    k, s, p = (3, 1, 1) if arch["small_stem"] else (conv.kernel_size, conv.stride, conv.padding)
    setattr(model.get_submodule(parent_name), attr,
            torch.nn.Conv2d(arch["in_channels"], conv.out_channels, k, s, p,
                            bias=conv.bias is not None))
    if arch["small_stem"] and hasattr(model, "maxpool"):
        model.maxpool = torch.nn.Identity()
    model.load_state_dict(load_file(weights), strict=True)
    model.eval()
    z = np.load(test_npz)
    x = torch.from_numpy(z["x"].astype(np.float32) / np.float32(pre["scale"]))
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
    assert "obliviate" not in sys.modules
    print(json.dumps({"accuracy": float((pred.numpy() == z["y"]).mean())}))
    """
)


@pytest.fixture(scope="module")
def torchvision_forgotten(tmp_path_factory):
    """torchvision:shufflenet_v2_x0_5 with the small stem on digits: trained, one deletion."""
    folder = tmp_path_factory.mktemp("tv")
    cfg = workspace(folder, model="torchvision:shufflenet_v2_x0_5", small_stem=True)
    record = forget_and_check_replay(cfg)
    return cfg, record


@pytest.mark.slow
def test_torchvision_model_trains_forgets_and_replays(torchvision_forgotten):
    cfg, record = torchvision_forgotten  # the fixture checked the replay
    arch = ParamStore.open(cfg.paths.store).meta["extra"]["architecture"]
    assert arch["kind"] == "torchvision" and arch["small_stem"] is True
    assert arch["in_channels"] == 1 and "Identity()" in arch["modules"]
    assert record["stop_block"] >= 2


@pytest.mark.slow
def test_export_loads_without_obliviate_and_reproduces_evaluate(torchvision_forgotten, tmp_path):
    from obliviate.export import export_model

    cfg, _ = torchvision_forgotten
    out = tmp_path / "served.safetensors"
    side = export_model(cfg, out, "safetensors")
    assert side["served"] and side["deletions"] == 1 and side["dataset"]["n_classes"] == 10
    assert side["store"]["fingerprint"] == ParamStore.open(cfg.paths.store).meta["fingerprint"]
    assert json.loads((tmp_path / "served.safetensors.json").read_text()) == side
    script = tmp_path / "reader.py"
    script.write_text(FOREIGN_READER)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH: no obliviate
    done = subprocess.run(
        [sys.executable, str(script), str(out), str(cfg.paths.test)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["accuracy"] == evaluate_store(cfg)["accuracy"]


def test_export_and_the_readme_zarr_reader_give_shifted_rows(tmp_path):
    from obliviate.export import export_model

    short = {**TINY, "prepare": {"blocks": 6}, "forget": {**TINY["forget"], "max_blocks": 2}}
    cfg = load_config(write_params(tmp_path, **short))
    prepare(cfg)
    stored_training(cfg)
    record = forget(cfg, [str(load_block(cfg.paths.blocks, 2).ids[3])], force=True)
    store = ParamStore.open(cfg.paths.store)
    ((lo, hi),) = store.meta["shifts"][0]["ranges"]
    assert (lo, hi) == (record["stop_block"] + 1, 5)
    side = export_model(cfg, tmp_path / "row.pt", "pt", row=lo)
    assert side["row"] == lo and not side["served"] and side["stitching_shifts"] == 1
    state = torch.load(tmp_path / "row.pt", weights_only=True)
    flat = torch.cat([state[e["name"]].reshape(-1) for e in store.meta["layout"]]).numpy()
    assert np.array_equal(flat, store.read(lo)[0])  # P_k, stitching shift included
    assert not np.array_equal(flat, store.params[lo])
    with pytest.raises(StoreError, match="--row 99 is not a row"):
        export_model(cfg, tmp_path / "bad.pt", "pt", row=99)
    assert not (tmp_path / "bad.pt").exists()
    # the README's zarr-only reader gives every P_k exactly as ParamStore.read does
    blocks = (ROOT / "README.md").read_text().split("```python\n")
    snippet = next(b.split("```")[0] for b in blocks if "def read_row" in b)
    namespace: dict = {}
    exec(snippet.replace("models/store.zarr", str(cfg.paths.store)), namespace)
    for k in range(cfg.prepare.blocks + 1):
        assert np.array_equal(namespace["read_row"](k), store.read(k)[0]), k
    assert set(namespace["state"]) == {e["name"] for e in store.meta["layout"]}


def test_image_folder_batches_through_a_seeded_dataloader_replay_exactly(tmp_path):
    """Paths decoded by DataLoader workers give the same store as decoding in the trainer."""
    from PIL import Image

    from obliviate.data import Dataset, DatasetInfo, Samples
    from obliviate.partition import balanced_partition, write_blocks

    rng = np.random.default_rng(0)
    paths = []
    for i in range(24):
        (tmp_path / "img" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "img" / f"c{i % 3}" / f"{i}.png")
        paths.append(f"c{i % 3}/{i}.png")
    y = np.arange(24) % 3
    s = Samples(np.array([f"img:{p}" for p in paths]), y, np.array(paths))
    info = DatasetInfo("img", 3, (3, 12, 12), 255.0, image_root=str(tmp_path / "img"))
    stores = []
    for workers in (0, 2):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        train = {"model": "lenet5", "epochs": 1, "batch_size": 5, "image_size": 12}
        cfg = load_config(write_params(folder, prepare={"blocks": 2},
                                       train={**train, "workers": workers}))  # fmt: skip
        ds = Dataset(info, s, s.take(np.arange(6)))
        write_blocks(ds, balanced_partition(y, 2, 0), cfg.paths.blocks, cfg.paths.test, {})
        trainer = Trainer.from_config(cfg)
        assert trainer.loader.workers == workers
        store = stored_training(cfg)
        theta, _ = trainer.run_block(2, *store.read(1))
        assert np.array_equal(theta.numpy(), store.read(2)[0])
        stores.append(store.params[:])
    assert np.array_equal(stores[0], stores[1])


def test_batchnorm_on_a_single_sample_batch_is_one_sentence(tmp_path):
    cfg = workspace(tmp_path, model="toy_models:flat_batchnorm", batch_size=1)
    with pytest.raises(ConfigError, match="a training batch of a single sample"):
        stored_training(cfg)


@pytest.mark.slow  # three CLI processes
def test_export_command_writes_both_files_and_refuses_in_one_sentence(tmp_path):
    from test_cli import run_cli

    cfg = workspace(tmp_path)
    stored_training(cfg)
    params = str(cfg.root / "params.yaml")
    ok = run_cli("export", "-o", str(tmp_path / "m.safetensors"), "--params", params)
    assert ok.returncode == 0 and "exported P_4 (served) of lenet5" in ok.stdout, ok.stderr
    side = json.loads((tmp_path / "m.safetensors.json").read_text())
    assert side["architecture"]["model"] == "lenet5" and side["deletions"] == 0
    for args, message in ((["--format", "onnx"], "use safetensors or pt"),
                          (["--row", "9"], "choose 0..4")):  # fmt: skip
        bad = run_cli("export", "-o", str(tmp_path / "x.pt"), *args, "--params", params)
        assert bad.returncode == 2 and message in bad.stderr
        assert bad.stderr.strip().count("\n") == 0 and not (tmp_path / "x.pt").exists()
