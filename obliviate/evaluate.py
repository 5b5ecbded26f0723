"""Test accuracy of a stored checkpoint (by default the served model, P_B)."""

from __future__ import annotations

import numpy as np

from obliviate.config import Config
from obliviate.models import layout
from obliviate.partition import load_samples
from obliviate.predict import accuracy, predict
from obliviate.store import ParamStore
from obliviate.train import Trainer


def test_predictions(cfg: Config, trainer: Trainer, theta) -> np.ndarray:
    """Predictions (N,) of the model with parameters ``theta`` on the test set."""
    return predict(trainer, theta, load_samples(cfg.paths.test).x, cfg.evaluate.batch_size)


def test_accuracy(cfg: Config, trainer: Trainer, theta) -> float:
    return accuracy(trainer, theta, load_samples(cfg.paths.test), cfg.evaluate.batch_size)


def evaluate_store(cfg: Config, row: int | None = None) -> dict:
    """Metrics of row ``row`` (default: the last, the served model) of the store."""
    from obliviate.fsck import preflight

    preflight(cfg)  # a damaged store or block stops it before metrics are written
    store = ParamStore.open(cfg.paths.store)
    store.require_complete()
    k = store.n_blocks if row is None else row
    trainer = Trainer.from_config(cfg, cfg.evaluate.device, "evaluate.device")
    store.require_layout(layout(trainer.model))  # train.model changed since: not this model
    theta = store.read_params(k)
    n_test = len(load_samples(cfg.paths.test))
    return {"accuracy": test_accuracy(cfg, trainer, theta), "n_test": n_test, "checkpoint": k}
