"""Test accuracy of a stored checkpoint (by default the served model, P_B)."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from obliviate.config import Config
from obliviate.models import layout, load_flat
from obliviate.partition import load_samples
from obliviate.store import ParamStore
from obliviate.train import Trainer, determinism_error


@contextmanager
def all_cores():
    """Inference may use every core: only training is bound to train.threads for replay."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def predict(model: nn.Module, x: np.ndarray, to_inputs, batch_size: int) -> np.ndarray:
    """Class predictions (N,) for samples x, on the device the model is on."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with torch.no_grad(), all_cores():
            for start in range(0, len(x), batch_size):
                inputs = to_inputs(x[start : start + batch_size]).to(device, non_blocking=True)
                out.append(model(inputs).argmax(1).cpu().numpy())
    except RuntimeError as exc:  # deterministic mode: an op without a deterministic kernel
        error = determinism_error(exc)
        if error is None:
            raise
        raise error from None
    return np.concatenate(out) if out else np.array([], dtype=np.int64)


def accuracy(trainer: Trainer, theta: torch.Tensor, cfg: Config) -> float:
    test = load_samples(cfg.paths.test)
    load_flat(trainer.model, torch.as_tensor(theta))
    pred = predict(trainer.model, test.x, trainer.to_inputs, cfg.evaluate.batch_size)
    return float((pred == test.y).mean())


def evaluate_store(cfg: Config, row: int | None = None) -> dict:
    """Metrics of row ``row`` (default: the last, the served model) of the store."""
    from obliviate.fsck import preflight

    preflight(cfg)  # a damaged store or block stops it before metrics are written
    store = ParamStore.open(cfg.paths.store)
    store.require_complete()
    k = store.n_blocks if row is None else row
    trainer = Trainer.from_config(cfg, cfg.evaluate.device, "evaluate.device")
    store.require_layout(layout(trainer.model))  # train.model changed since: not this model
    theta, _ = store.read(k)
    n_test = len(load_samples(cfg.paths.test))
    return {"accuracy": accuracy(trainer, theta, cfg), "n_test": n_test, "checkpoint": k}
