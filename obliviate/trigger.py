"""The verifying owner's backdoor trigger (Sommer et al., "Towards probabilistic verification of
machine unlearning"): planted in the data at partition time, stamped on images when they load.

A verifying owner contributes ``verify.owner_samples`` samples of block ``verify.owner_block``
that carry a trigger (a pixel patch, or out-of-range feature values) and the target label. The
original model learns the backdoor; after the owner's samples are forgotten it should not work
(``obliviate.gate`` tests that).
"""

from __future__ import annotations

import numpy as np

from obliviate.config import VerifyConfig
from obliviate.data import Dataset, DatasetInfo, Samples
from obliviate.errors import ConfigError

# A triggered image on disk is its relative path plus this mark and the trigger's corner, side
# and value; the image loader (train.make_inputs) stamps the patch when it reads the file. So the
# block files record exactly which samples carry which trigger, and replay stays exact.
TRIGGER_MARK = "#trigger="


def apply_trigger(x: np.ndarray, info: DatasetInfo, v: VerifyConfig) -> np.ndarray:
    """A triggered copy of samples x: (N, C, H, W) images, (N, F) standardised features, or
    (N,) image paths (marked, so the patch is applied when each image is loaded)."""
    if info.image_root is not None:
        _patch_region(v.patch_corner, v.patch, *info.input_shape[1:])  # checks the size
        mark = f"{TRIGGER_MARK}{v.patch_corner},{v.patch},{v.patch_value}"
        return np.char.add(np.asarray(x, dtype=str), mark)
    x = np.array(x, copy=True)
    if x.ndim == 4:
        rows, cols = _patch_region(v.patch_corner, v.patch, *x.shape[2:])
        x[:, :, rows, cols] = np.asarray(v.patch_value * info.scale).astype(x.dtype)
    else:
        if max(v.features, default=-1) >= x.shape[1]:
            raise ConfigError(f"verify.features must index the {x.shape[1]} features; fix them.")
        x[:, v.features] = v.feature_value
    return x


def _patch_region(corner: str, patch: int, h: int, w: int) -> tuple[slice, slice]:
    if patch > min(h, w):
        raise ConfigError(f"verify.patch {patch} exceeds the {h}x{w} images; make it smaller.")
    rows = slice(0, patch) if corner.startswith("top") else slice(h - patch, h)
    cols = slice(0, patch) if corner.endswith("left") else slice(w - patch, w)
    return rows, cols


def split_trigger(entry: str) -> tuple[str, str | None]:
    """A marked image path -> (relative path, trigger spec or None)."""
    path, mark, spec = entry.rpartition(TRIGGER_MARK)
    return (path, spec) if mark else (entry, None)


def stamp_trigger(image, spec: str | None, scale: float):
    """A loaded (C, H, W) image tensor with the trigger ``spec`` from split_trigger stamped on."""
    if spec is None:
        return image
    corner, patch, value = spec.split(",")
    rows, cols = _patch_region(corner, int(patch), *image.shape[1:])
    image = image.clone()
    image[:, rows, cols] = int(float(value) * scale)
    return image


_OPPOSITE = {"top-left": "bottom-right", "bottom-right": "top-left",
             "top-right": "bottom-left", "bottom-left": "top-right"}  # fmt: skip


def control_trigger(v: VerifyConfig, n_features: int | None) -> VerifyConfig:
    """A trigger of the same kind that the owner never used: the patch in the opposite corner,
    or the out-of-range value on the next features. How often it yields the target estimates
    the hit rate of a model that never learned the owner's trigger (H0), without a naive model.
    """
    if n_features is None:  # images: only the corner moves
        return v.model_copy(update={"patch_corner": _OPPOSITE[v.patch_corner]})
    shifted = [(f + len(v.features)) % n_features for f in v.features]
    if set(shifted) & set(v.features) and v.q_source == "control":
        raise ConfigError(
            f"verify.q_source control needs {2 * len(v.features)} distinct features, the data "
            f"has {n_features}; use q_source clean or naive."
        )
    return v.model_copy(update={"patch_corner": _OPPOSITE[v.patch_corner], "features": shifted})


def plant_owner(
    dataset: Dataset, blocks: list[np.ndarray], v: VerifyConfig, seed: int
) -> tuple[Dataset, list[str]]:
    """Give the owner ``v.owner_samples`` non-target samples of block ``v.owner_block``, with the
    trigger and the target label. Returns the new dataset and the owner's sample ids."""
    if not v.enabled:
        return dataset, []
    if v.owner_block > len(blocks):
        raise ConfigError(
            f"verify.owner_block {v.owner_block} exceeds the {len(blocks)} blocks; lower it."
        )
    if v.target >= dataset.info.n_classes:
        raise ConfigError(
            f"verify.target {v.target} is not one of the {dataset.info.n_classes} classes."
        )
    block = blocks[v.owner_block - 1]
    eligible = block[dataset.train.y[block] != v.target]
    n_owner = v.owner_count(len(block))
    if n_owner > len(eligible):
        raise ConfigError(
            f"verify.owner_samples {v.owner_samples} exceeds the {len(eligible)} non-target "
            f"samples of block {v.owner_block}; lower it (or give a share of the block, e.g. 0.25)."
        )
    owner = np.sort(
        np.random.default_rng([seed, v.owner_block]).choice(eligible, n_owner, replace=False)
    )
    x, y = dataset.train.x.copy(), dataset.train.y.copy()
    if x.dtype.kind == "U":  # image paths: the marked paths are longer than the column allows
        x = x.astype(object)
    x[owner] = apply_trigger(x[owner], dataset.info, v)
    x = x.astype(str) if x.dtype == object else x
    y[owner] = v.target
    train = Samples(dataset.train.ids, y, x)
    return Dataset(dataset.info, train, dataset.test), [str(i) for i in dataset.train.ids[owner]]
