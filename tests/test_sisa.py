import numpy as np
import yaml
from conftest import ROOT

from obliviate.config import load_config
from obliviate.partition import load_block, load_samples
from obliviate.sisa import forget_sisa, train_sisa, vote
from obliviate.train import Trainer


def test_sisa_retrains_only_the_affected_shard_from_the_affected_slice(prepared):
    real_recipe = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    # constant lr: then shard 0's first slice must be exactly stored training's block 1
    cfg = load_config(
        prepared.root / "params.yaml", train={**real_recipe, "lr_schedule": "constant"}
    )
    trainer = Trainer.from_config(cfg)  # 6 blocks -> 2 shards x 3 slices
    sisa = train_sisa(trainer, shards=2)
    before = [[t.copy() for t, _ in shard] for shard in sisa.checkpoints]
    theta_1, _ = trainer.run_block(1, *trainer.initial_state())
    assert np.array_equal(before[0][1], theta_1.numpy())
    victim = str(load_block(prepared.paths.blocks, 5).ids[0])  # shard 1, slice 2
    forget_sisa(trainer, sisa, {5: [victim]})
    after = [[t for t, _ in shard] for shard in sisa.checkpoints]
    assert all(np.array_equal(a, b) for a, b in zip(after[0], before[0], strict=True))
    assert np.array_equal(after[1][1], before[1][1])  # slice 1 of shard 1 untouched
    assert not np.array_equal(after[1][2], before[1][2]) and len(after[1]) == 4
    test = load_samples(prepared.paths.test)
    pred = vote(trainer, sisa, test.x, trainer.info.n_classes, 256)
    assert pred.shape == test.y.shape and (pred == test.y).mean() > 0.6
