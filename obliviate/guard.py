"""The accuracy guard: is a stitched M' as good as the original model, on data neither trained on?

Partition carves a label-balanced validation split that no model ever trains on (block 0 of the
index, ``validation.npz``). When stored training completes, the original model's predictions on
it are kept in the store attrs (``reference``, by validation slot). A deletion judges a candidate
M' on the same samples with a paired test: d_i = [M' right on i] - [original right on i] has
mean D and standard error se, and the guard refuses M' only when the one-sided upper bound
D + z * se (z for ``forget.guard_confidence``) is below -``forget.max_accuracy_drop``, that is,
when it is confident that M' lost more than the allowed drop. Noise alone refuses with
probability at most 1 - confidence. The reference is the original model, not the currently served
one, so a long stream of deletions cannot drift down one allowed drop at a time. After a
consolidation the reference is the consolidated model (``consolidation``): the newest exact one,
which is what a naive retrain without the deleted samples would serve.

The same evaluation is M''s accuracy in the audit record: a deletion evaluates M' once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from obliviate.config import Config
from obliviate.data import Samples
from obliviate.partition import load_block, read_manifest
from obliviate.predict import predict


@dataclass(frozen=True)
class StitchVerdict:
    """The guard's judgement of one candidate M' (the gate's is ``gate.GateVerdict``)."""

    accepted: bool
    accuracy: float  # M' on the validation split
    reference_accuracy: float  # the original model on the same samples
    difference: float  # mean paired difference D (accuracy points as a fraction)
    upper_bound: float  # D + z * se
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def paired_verdict(
    right: np.ndarray, ref_right: np.ndarray, max_drop: float, confidence: float
) -> StitchVerdict:
    """The paired one-sided test on per-sample correctness (bool arrays of equal length)."""
    d = right.astype(np.float64) - ref_right.astype(np.float64)
    n = len(d)
    mean = float(d.mean())
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    upper = mean + NormalDist().inv_cdf(confidence) * se
    return StitchVerdict(
        accepted=upper >= -max_drop,
        accuracy=float(right.mean()),
        reference_accuracy=float(ref_right.mean()),
        difference=mean,
        upper_bound=upper,
        n=n,
    )


def validation_samples(cfg: Config) -> Samples | None:
    """The validation split, or None where the partition has none (an empty one counts too)."""
    if "validation" not in read_manifest(cfg.paths.blocks):
        return None
    val = load_block(cfg.paths.blocks, 0)
    return val if len(val) else None


def reference_of(cfg: Config, trainer, theta: np.ndarray) -> dict | None:
    """The guard's yardstick for the model ``theta``: its predictions on the validation split,
    by slot (-1 for a slot whose sample has left), and its accuracy there; None without one."""
    val = validation_samples(cfg)
    if val is None:
        return None
    pred = predict(trainer, theta, val.x, cfg.evaluate.batch_size)
    slots = read_manifest(cfg.paths.blocks)["validation"]["slots"]
    by_slot = np.full(max(slots, int(val.slot.max()) + 1), -1, dtype=np.int64)
    by_slot[val.slot] = pred
    return {"val_predictions": by_slot.tolist(), "val_accuracy": float((pred == val.y).mean())}


def record_reference(cfg: Config, store, trainer) -> None:
    """Keep the freshly trained model's reference (``reference_of``) in the store attrs."""
    if "reference" in store.meta:
        return
    reference = reference_of(cfg, trainer, store.read_params(store.n_blocks))
    if reference is not None:
        store.update_meta(reference=reference)


class Guard:
    """forget.max_accuracy_drop as a judge of candidate models (see the module docstring)."""

    def __init__(self, cfg: Config, trainer, store, exclude: list[str] = ()):
        """``exclude``: validation ids the deletion removes; M' is never judged on them."""
        self.cfg, self.trainer = cfg, trainer
        self.val = validation_samples(cfg)
        if self.val is not None and len(exclude):
            kept = self.val.take(~np.isin(self.val.ids, list(exclude)))
            self.val = kept if len(kept) else None
        self.reference = None
        if self.val is not None:
            ref = store.meta.get("reference")
            if ref is not None:  # the original model's predictions, by slot
                self.reference = np.asarray(ref["val_predictions"])[self.val.slot]
            else:  # a store trained before references existed: the served model stands in
                served = store.read_params(store.n_blocks)
                self.reference = self.predict(served)

    @property
    def enabled(self) -> bool:
        return self.cfg.forget.max_accuracy_drop is not None and self.val is not None

    def predict(self, theta: np.ndarray) -> np.ndarray:
        return predict(self.trainer, theta, self.val.x, self.cfg.evaluate.batch_size)

    def judge(self, theta: np.ndarray) -> StitchVerdict | None:
        """M' against the original; None when there is no validation split to judge on."""
        if self.val is None:
            return None
        f = self.cfg.forget
        right = self.predict(theta) == self.val.y
        drop = 1.0 if f.max_accuracy_drop is None else f.max_accuracy_drop  # off: never refuses
        return paired_verdict(right, self.reference == self.val.y, drop, f.guard_confidence)
