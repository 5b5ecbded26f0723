"""The store's identity and whether it fits what is at hand: replay is bit-exact only with the
params, blocks, model and device class that built the store.

- ``fingerprint_for``: what a store depends on (the prepare and train params, a pretrained start's
  digest, the blocks' contents), kept in its attrs;
- ``require_usable``: everything a deletion needs of a store before it retrains from it;
- ``require_same_device`` and ``require_same_model``: the two checks a resume needs too.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from obliviate.config import Config
from obliviate.device import device_record
from obliviate.errors import ConfigError, StoreError
from obliviate.models import file_sha256
from obliviate.partition import read_manifest

# train keys that do not change the stored rows: where training runs (the device class is
# checked by require_same_device), how images are decoded, and the init file's path (its
# sha256 digest counts instead).
NOT_FINGERPRINTED = {"device", "workers", "init"}


def fingerprint_for(cfg: Config, manifest: dict) -> str:
    """What a store depends on: the prepare and train params, the pretrained start's digest and
    the blocks' contents."""
    blocks = hashlib.sha256("".join(b["sha256"] for b in manifest["blocks"]).encode()).hexdigest()
    payload = {
        "prepare": cfg.prepare.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json", exclude=NOT_FINGERPRINTED),
        "init_sha256": None if cfg.train.init is None else init_digest(cfg.train.init),
    }
    params = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"{params}:{blocks}"


def init_digest(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(f"train.init {path} does not exist; fix the path or set it to null.")
    return file_sha256(path)


def store_fingerprint(cfg: Config) -> str:
    return fingerprint_for(cfg, read_manifest(cfg.paths.blocks))


def require_usable(cfg: Config, store, trainer) -> None:
    """A deletion retrains from ``store`` (a local one) with ``trainer``, or not at all: a
    complete store built from today's params and blocks, on this device class, with this model
    (replay would not be exact otherwise); else one sentence."""
    store.require_complete()
    require_same_thinning(cfg, store)
    if store.meta["fingerprint"] != store_fingerprint(cfg):  # replay would not be exact
        raise StoreError(
            f"{store.path} was built with other params or blocks than params.yaml and "
            f"{cfg.paths.blocks} hold now; restore the params it was built with, or retrain with "
            "`obliviate train --overwrite`."
        )
    require_same_device(store, trainer, allow_inexact=False)
    require_same_model(store, trainer)


def require_same_thinning(cfg: Config, store) -> None:
    """A store keeps the rows of the train.store_every it was written with; another s would
    name rows it does not hold as kept."""
    if store.store_every != cfg.train.store_every:
        raise StoreError(
            f"{store.path} keeps every {store.store_every}th row but params.yaml sets "
            f"train.store_every: {cfg.train.store_every}; set it back to {store.store_every}, or "
            "retrain with `obliviate train --overwrite`."
        )


def require_same_model(store, trainer) -> None:
    """The architecture recorded at training (modules, builder and, for an import path, its
    source file's sha256) must equal today's."""
    built = store.meta["extra"].get("architecture")
    if built is not None and trainer.architecture is not None and built != trainer.architecture:
        changed = sorted(k for k in {**built, **trainer.architecture}
                         if built.get(k) != trainer.architecture.get(k))  # fmt: skip
        raise StoreError(
            f"{store.path} was trained with another model ({', '.join(changed)} changed); "
            "restore the model code and train params, or retrain with `obliviate train "
            "--overwrite`."
        )


def require_same_device(store, trainer, allow_inexact: bool) -> dict | None:
    """Refuse to replay ``store`` on another device class than the one that built it (replay is
    bit-exact only on the same class: kernels differ between CPUs and GPU models).

    With ``allow_inexact`` the replay goes ahead: block 1 is replayed here from the stored P_0
    (row 1 is always exactly reproducible: no stitching shift covers it), the largest absolute
    difference against the stored P_1 is measured, recorded in the store's attrs (extra
    ``inexact_replays``) and returned. Returns None when the classes match.
    """
    meta = store.meta
    built = meta["extra"].get("device") or {"class": "cpu"}  # stores before devices: CPU only
    here = device_record(trainer.device, trainer.recipe.threads)
    if built["class"] == here["class"]:
        return None
    if not allow_inexact:
        raise StoreError(
            f"{store.path} was trained on {built['class']} and replay here would run on "
            f"{here['class']}, where it is not bit-exact; run on the same device class "
            "(train.device) or pass --allow-inexact to accept and record the difference."
        )
    record = {"from": built["class"], "to": here["class"], "row": None, "max_abs_diff": None,
              "torch": here["torch"], "cuda": here["cuda"],
              "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    if store.completed >= 1 and trainer.parallel.size == 1:  # (a lone rank cannot all-reduce)
        first = next(k for k in range(1, store.completed + 1) if store.is_kept(k))
        theta, opt = store.read(0)
        for k in range(1, first + 1):  # up to the first kept row (train.store_every)
            replayed, opt = trainer.run_block(k, theta, opt)
            theta, opt = replayed.numpy(), None if opt is None else opt.numpy()
        stored = store.read(first)[0].astype(np.float64)
        diff = np.abs(theta.astype(np.float64) - stored).max()
        record.update(row=first, max_abs_diff=float(diff))
    meta = store.meta
    replays = [*meta["extra"].get("inexact_replays", []), record]
    extra = {**meta["extra"], "inexact_replays": replays}
    store.params.attrs["obliviate"] = {**meta, "extra": extra}
    return record
