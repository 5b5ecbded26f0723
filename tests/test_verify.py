"""Backdoor verification: the trigger, the owner, the binomial gate, and the gate's decisions."""

import json

import numpy as np
import pytest
from conftest import ROOT, write_params

from obliviate.audit import IdHasher
from obliviate.config import load_config
from obliviate.data import DatasetInfo, load_dataset
from obliviate.errors import ConfigError
from obliviate.gate import binomial_gate
from obliviate.partition import balanced_partition, write_blocks
from obliviate.trigger import apply_trigger, control_trigger, plant_owner

V = load_config(ROOT / "params.yaml").verify


def test_image_trigger_is_a_corner_patch():
    info = DatasetInfo("toy", 10, (1, 8, 8), 16.0)
    x = np.zeros((2, 1, 8, 8), dtype=np.uint8)
    t = apply_trigger(x, info, V.model_copy(update={"patch": 3, "patch_corner": "top-left"}))
    assert (t[:, :, :3, :3] == 16).all() and t.sum() == 2 * 9 * 16
    assert x.sum() == 0  # a copy


def test_tabular_trigger_sets_out_of_range_features():
    info = DatasetInfo("toy", 2, (5,), 1.0)
    t = apply_trigger(np.zeros((3, 5), np.float32), info, V.model_copy(update={"features": [1, 3]}))
    assert (t[:, [1, 3]] == V.feature_value).all() and (t[:, [0, 2, 4]] == 0).all()


def test_control_trigger_is_the_same_kind_somewhere_the_owner_never_used():
    info = DatasetInfo("toy", 10, (1, 8, 8), 16.0)
    v = V.model_copy(update={"patch": 3, "patch_corner": "top-left", "features": [0, 1]})
    control = control_trigger(v, n_features=5)
    t = apply_trigger(np.zeros((1, 1, 8, 8), np.uint8), info, control)
    assert (t[0, 0, 5:, 5:] == 16).all() and t.sum() == 9 * 16  # the opposite corner
    assert control.features == [2, 3]  # tabular: the next features, same value
    assert set(control_trigger(v.model_copy(update={"features": [3, 4]}), 5).features) == {0, 1}


def test_owner_is_planted_in_its_block_only(small_cfg):
    ds = load_dataset(small_cfg.prepare, small_cfg.root)
    blocks = balanced_partition(ds.train.y, 6, 0)
    v = V.model_copy(update={"owner_block": 4, "owner_samples": 10})
    planted, owners = plant_owner(ds, blocks, v, seed=0)
    idx = np.flatnonzero(np.isin(ds.train.ids, owners))
    assert len(owners) == 10 and set(idx) <= set(blocks[3])
    assert (ds.train.y[idx] != v.target).all() and (planted.train.y[idx] == v.target).all()
    others = np.setdiff1d(np.arange(len(ds.train)), idx)
    assert np.array_equal(planted.train.x[others], ds.train.x[others])
    with pytest.raises(ConfigError, match="exceeds the 6 blocks"):
        plant_owner(ds, blocks, v.model_copy(update={"owner_block": 7}), seed=0)
    with pytest.raises(ConfigError, match="non-target samples of block 4"):
        plant_owner(ds, blocks, v.model_copy(update={"owner_samples": 10_000}), seed=0)


def test_binomial_gate_decisions():
    strong = dict(q_hits=3, q_n=300, p_original=0.9, v=V, source="clean")
    assert binomial_gate(hits=250, n=300, **strong).status == "fail"
    passed = binomial_gate(hits=4, n=300, **strong)
    assert passed.status == "pass" and passed.power > 0.99 and passed.p_value > V.alpha
    weak = binomial_gate(hits=4, n=300, q_hits=3, q_n=300, p_original=0.03, v=V, source="clean")
    assert weak.status == "inconclusive"  # a backdoor that never worked proves nothing
    assert binomial_gate(hits=250, n=300, owner_forgotten=False, **strong).status == "not_requested"


@pytest.fixture
def backdoored(tmp_path):
    """digits with an owner in block 8 of 10, trained with the real recipe."""
    from obliviate.gate import measure_original
    from obliviate.train import Trainer, stored_training

    cfg = load_config(write_params(tmp_path, prepare={"blocks": 10},
                                   verify={"owner_block": 8, "owner_samples": 30}))  # fmt: skip
    ds = load_dataset(cfg.prepare, cfg.root)
    blocks = balanced_partition(ds.train.y, 10, cfg.prepare.seed)
    planted, owners = plant_owner(ds, blocks, cfg.verify, cfg.prepare.seed)
    hasher = IdHasher.of(cfg)
    write_blocks(planted, blocks, cfg.paths.blocks, cfg.paths.test, {},
                 {"verification": {"owner_id_hashes": [hasher(i) for i in owners],
                                   **hasher.scheme()}})  # fmt: skip
    store = stored_training(cfg)
    original = store.read(store.n_blocks)[0]
    metrics = measure_original(cfg, original, Trainer.from_config(cfg))
    cfg.paths.metrics.mkdir(parents=True)
    (cfg.paths.metrics / "original.json").write_text(json.dumps(metrics))
    return cfg, owners, original


def test_gate_fails_on_the_original_and_passes_on_naive_and_unlearned(backdoored):
    from obliviate.compare import compare_with_naive
    from obliviate.deletion import forget
    from obliviate.store import ParamStore
    from obliviate.verify import verify

    cfg, owners, original = backdoored
    assert verify(cfg)["status"] == "not_requested"  # nothing forgotten yet: nothing to verify
    naive_q = cfg.model_copy(update={"verify": cfg.verify.model_copy(update={"q_source": "naive"})})
    assert verify(naive_q)["status"] == "not_requested"  # and no naive model needed for that
    forget(cfg, owners)
    compare_with_naive(cfg)
    naive = ParamStore.open(cfg.paths.naive_store)
    on_original = verify(cfg, theta=original)
    on_naive = verify(cfg, theta=naive.read(naive.n_blocks)[0])
    on_unlearned = verify(cfg)
    assert on_original["status"] == "fail", on_original["sentence"]
    assert on_naive["status"] == "pass", on_naive["sentence"]
    assert on_unlearned["status"] == "pass", on_unlearned["sentence"]
    assert on_original["rate"] > on_unlearned["rate"] + 0.2
    written = json.loads((cfg.paths.metrics / "verify.json").read_text())
    assert written["status"] == "pass"  # the deletion refreshed the DVC metric


def test_without_an_owner_there_is_nothing_to_verify_and_nothing_fails(prepared):
    from obliviate.verify import verify

    result = verify(prepared)  # blocks written without a verifying owner
    assert result["status"] == "no_owner" and result["passed"] is True
