"""Stored training: the replay-exactness invariant, resume, and refusal of foreign stores."""

import numpy as np
import pytest
import zarr
from conftest import Interrupted, crash_after, write_params

from obliviate.config import load_config
from obliviate.errors import StoreError
from obliviate.evaluate import evaluate_store
from obliviate.store import ParamStore
from obliviate.train import Trainer, block_lr, stored_training


def bits(t) -> np.ndarray:
    return np.asarray(t).view(np.uint32)


def assert_replay_exact(cfg) -> ParamStore:
    """Retraining block k from the stored P_{k-1} reproduces the stored P_k bit for bit."""
    store = stored_training(cfg)
    trainer = Trainer.from_config(cfg)
    for k in range(1, store.n_blocks + 1):
        theta, opt = store.read(k - 1)
        new_theta, new_opt = trainer.run_block(k, theta, opt)
        want_theta, want_opt = store.read(k)
        assert np.array_equal(bits(new_theta), bits(want_theta)), f"P_{k} differs on replay"
        if want_opt is not None:
            assert np.array_equal(bits(new_opt), bits(want_opt)), f"optimizer state {k} differs"
    return store


RECIPES = {
    "adam-kept": {"optimizer": "adam", "keep_optimizer_state": True},
    "adam-fresh": {"optimizer": "adam", "keep_optimizer_state": False},
    "sgd-momentum-cosine": {"optimizer": "sgd", "lr": 0.05, "lr_schedule": "cosine"},
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_replay_of_every_block_is_bit_exact(prepared, recipe):
    cfg = load_config(prepared.root / "params.yaml", train=RECIPES[recipe])
    store = assert_replay_exact(cfg)
    assert (store.optimizer is None) == (not cfg.train.keep_optimizer_state)


def test_replay_exact_with_dropout_model(tmp_path):
    """vgg11 has dropout: the per-block seed must cover the global RNG too."""
    # vgg11 needs 32x32 inputs: write blocks of random 32x32 images directly.
    from obliviate.data import Dataset, DatasetInfo, Samples
    from obliviate.partition import balanced_partition, write_blocks

    vgg = {"model": "vgg11", "epochs": 1, "batch_size": 8}
    cfg = load_config(write_params(tmp_path, prepare={"blocks": 2}, train=vgg))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (24, 3, 32, 32), dtype=np.uint8)
    y = np.arange(24) % 3
    s = Samples(np.array([f"toy:{i}" for i in range(24)]), y, x)
    ds = Dataset(DatasetInfo("toy", 3, (3, 32, 32), 255.0), s, s.take(np.arange(6)))
    write_blocks(ds, balanced_partition(y, 2, 0), cfg.paths.blocks, cfg.paths.test, {})
    assert_replay_exact(cfg)


def test_store_is_plain_zarr_with_layout(prepared):
    store = stored_training(prepared)
    arr = zarr.open(str(prepared.paths.store), mode="r")["params"]
    meta = arr.attrs["obliviate"]
    assert arr.shape == (
        prepared.prepare.blocks + 1,
        meta["layout"][-1]["offset"] + meta["layout"][-1]["size"],
    )
    assert meta["completed"] == prepared.prepare.blocks
    assert [e["name"] for e in meta["layout"]][:2] == ["features.0.weight", "features.0.bias"]
    theta, _ = store.read(prepared.prepare.blocks)
    assert np.array_equal(bits(arr[-1]), bits(theta))
    assert not np.array_equal(arr[0], arr[-1])
    assert store.nbytes_stored() < store.nbytes_raw()


def test_interrupted_training_resumes_to_the_same_store(prepared, tmp_path):
    reference = stored_training(prepared)
    want = reference.params[:]
    import shutil

    shutil.rmtree(prepared.paths.store)

    with pytest.raises(Interrupted):
        stored_training(prepared, on_block=crash_after(3))
    assert ParamStore.open(prepared.paths.store).completed == 3
    resumed = stored_training(prepared)
    assert resumed.completed == prepared.prepare.blocks
    assert np.array_equal(bits(resumed.params[:]), bits(want))


def test_store_built_with_other_params_is_refused_and_untouched(prepared):
    store = stored_training(prepared)
    before = store.params[:]
    other = load_config(prepared.root / "params.yaml", train={"lr": 0.01})
    with pytest.raises(StoreError, match=r"built with other params.*--overwrite"):
        stored_training(other)
    assert np.array_equal(ParamStore.open(prepared.paths.store).params[:], before)
    assert not np.array_equal(stored_training(other, overwrite=True).params[-1], before[-1])


def test_default_recipe_learns_the_default_task(prepared):
    import yaml
    from conftest import ROOT

    real_recipe = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    cfg = load_config(prepared.root / "params.yaml", train=real_recipe)
    stored_training(cfg)
    assert evaluate_store(cfg)["accuracy"] > 0.8  # 10 classes: chance is 0.1


def test_cosine_schedule_ends_at_lr_final(small_cfg):
    cfg = load_config(
        small_cfg.root / "params.yaml", train={"lr_schedule": "cosine", "lr_final": 0.1}
    )
    assert block_lr(cfg.train, 1, 10) == pytest.approx(cfg.train.lr)
    assert block_lr(cfg.train, 10, 10) == pytest.approx(0.1 * cfg.train.lr)


def test_data_parallel_refuses_models_with_batch_statistics_or_dropout():
    from obliviate.errors import StoreError
    from obliviate.models import build_model
    from obliviate.train import require_data_parallel_exact

    require_data_parallel_exact(build_model("lenet5", (1, 28, 28), 10, 128))
    for name in ("resnet18", "vgg11"):
        with pytest.raises(StoreError, match="without BatchNorm or Dropout"):
            require_data_parallel_exact(build_model(name, (3, 32, 32), 10, 128))
