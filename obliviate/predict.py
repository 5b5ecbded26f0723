"""Load a parameter vector into the trainer's model and predict: the one way every part of
obliviate (the guard, the gate, evaluation, the naive comparison, SISA) asks a model for labels."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch

from obliviate.device import determinism_error
from obliviate.models import load_flat


@contextmanager
def all_cores():
    """Inference may use every core: only training is bound to train.threads for replay."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def predict(trainer, theta, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class predictions (N,) of the model with parameters ``theta`` on samples ``x`` (block
    rows: images, features or image paths), on the device the trainer's model is on."""
    model = trainer.model
    load_flat(model, torch.as_tensor(theta))
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with torch.no_grad(), all_cores():
            for start in range(0, len(x), batch_size):
                inputs = trainer.to_inputs(x[start : start + batch_size])
                out.append(model(inputs.to(device, non_blocking=True)).argmax(1).cpu().numpy())
    except RuntimeError as exc:  # deterministic mode: an op without a deterministic kernel
        error = determinism_error(exc)
        if error is None:
            raise
        raise error from None
    return np.concatenate(out) if out else np.array([], dtype=np.int64)


def accuracy(trainer, theta, samples, batch_size: int) -> float:
    """The share of ``samples`` (with x and y) the model with parameters ``theta`` gets right."""
    return float((predict(trainer, theta, samples.x, batch_size) == samples.y).mean())


def majority_rate(labels: np.ndarray) -> float:
    """The accuracy of always answering the most common class: the floor a model must clear."""
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0
