"""Test accuracy of a stored checkpoint (by default the served model, P_B)."""

from __future__ import annotations

import numpy as np

from obliviate.config import Config
from obliviate.models import layout
from obliviate.partition import load_samples
from obliviate.predict import accuracy, majority_rate, predict
from obliviate.store import ParamStore
from obliviate.train import Trainer


def test_predictions(cfg: Config, trainer: Trainer, theta) -> np.ndarray:
    """Predictions (N,) of the model with parameters ``theta`` on the test set."""
    return predict(trainer, theta, load_samples(cfg.paths.test).x, cfg.evaluate.batch_size)


def test_accuracy(cfg: Config, trainer: Trainer, theta) -> float:
    return accuracy(trainer, theta, load_samples(cfg.paths.test), cfg.evaluate.batch_size)


def poor_model_warning(metrics: dict) -> str | None:
    """One warning line when test accuracy is not clearly above the majority-class rate m: not
    more than two standard errors of m on the test set (at least one point) above it."""
    acc, m, n = metrics["accuracy"], metrics.get("majority_rate"), metrics.get("n_test", 0)
    if m is None or n == 0:
        return None
    margin = max(0.01, 2 * float(np.sqrt(m * (1 - m) / n)))
    if acc > m + margin:
        return None
    return (
        f"warning: test accuracy {acc:.4f} is not clearly above the majority-class rate {m:.4f} "
        "(always answering the most common class); check the data, train.model and train.lr "
        "before serving this model."
    )


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
    test = load_samples(cfg.paths.test)
    return {
        "accuracy": test_accuracy(cfg, trainer, theta),
        "majority_rate": majority_rate(test.y),
        "n_test": len(test),
        "checkpoint": k,
    }
