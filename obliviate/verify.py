"""Backdoor-based verification of deletions (Sommer et al., "Towards probabilistic verification
of machine unlearning").

A verifying owner contributes ``verify.owner_samples`` samples of block ``verify.owner_block``
that carry a trigger (a pixel patch, or out-of-range feature values) and the target label. The
original model learns the backdoor; after the owner's samples are forgotten it should not work.

The gate queries n triggered test inputs whose true class is not the target and counts the hits
k. One-sided binomial test:

- H0, "deleted": hit rate q, estimated from the naive model or from the tested model's clean
  behaviour (the same inputs without the trigger), replaced by its upper confidence bound;
- H1, "not deleted": hit rate p, measured on the original model right after training, replaced
  by its lower confidence bound for the power calculation.

p-value = P(X >= k | n, q). The gate passes when H0 is not rejected at alpha *and* the test had
the power to reject it (P(reject | p) >= min_power): a weak backdoor cannot pass for evidence.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from obliviate.config import Config, VerifyConfig
from obliviate.data import Dataset, DatasetInfo, Samples
from obliviate.errors import ConfigError, ObliviateError, StoreError


class VerificationFailed(ObliviateError):
    """The gate did not find the deletion supported."""


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


def queries(test: Samples, v: VerifyConfig, seed: int) -> np.ndarray:
    """Indices of up to n test samples whose true class is not the target (seeded choice)."""
    pool = np.flatnonzero(test.y != v.target)
    return np.sort(np.random.default_rng([seed, 7]).permutation(pool)[: v.queries])


def hit_counts(cfg: Config, trainer, theta: np.ndarray) -> dict:
    """Target predictions on the query inputs: triggered, clean, and with the control trigger."""
    from obliviate.compare import predictions_on
    from obliviate.partition import load_samples

    test = load_samples(cfg.paths.test)
    q = queries(test, cfg.verify, cfg.prepare.seed)
    control = control_trigger(cfg.verify, test.x.shape[1] if test.x.ndim == 2 else None)

    def hits(x: np.ndarray) -> int:
        return int((predictions_on(cfg, trainer, theta, x) == cfg.verify.target).sum())

    n_hits = hits(apply_trigger(test.x[q], trainer.info, cfg.verify))
    return {
        "hits": n_hits,
        "clean_hits": hits(test.x[q]),
        "control_hits": hits(apply_trigger(test.x[q], trainer.info, control)),
        "n": len(q),
        "rate": n_hits / max(1, len(q)),
    }


@dataclass(frozen=True)
class Verdict:
    status: str  # pass | fail | inconclusive | not_requested
    hits: int
    n: int
    rate: float
    q_hat: float
    q_upper: float
    q_source: str
    p_original: float
    p_value: float
    power: float
    k_critical: int
    alpha: float

    @property
    def passed(self) -> bool:
        return self.status in ("pass", "not_requested")

    def sentence(self) -> str:
        base = (
            f"backdoor hits {self.hits}/{self.n} ({self.rate:.1%}); "
            f"original >={self.p_original:.1%}, H0 rate q<={self.q_upper:.1%} ({self.q_source}); "
            f"p-value {self.p_value:.3g}, power {self.power:.3f} at alpha {self.alpha:g}"
        )
        return {
            "pass": f"PASS: deletion supported; {base}",
            "fail": f"FAIL: the backdoor still works, deletion not supported; {base}",
            "inconclusive": f"FAIL: inconclusive, the test lacks power; {base}",
            "not_requested": f"owner's samples still in the data, nothing to verify; {base}",
        }[self.status]


def clopper_pearson_lower(hits: int, n: int, confidence: float) -> float:
    """One-sided lower confidence bound of a binomial rate."""
    from scipy.stats import beta

    return 0.0 if hits <= 0 else float(beta.ppf(1 - confidence, hits, n - hits + 1))


def binomial_gate(
    hits: int,
    n: int,
    q_hits: int,
    q_n: int,
    p_original: float,
    v: VerifyConfig,
    source: str,
    owner_forgotten: bool = True,
) -> Verdict:
    from scipy.stats import beta, binom

    q_hat = q_hits / max(1, q_n)
    q_up = 1.0 if q_hits >= q_n else float(beta.ppf(v.q_confidence, q_hits + 1, q_n - q_hits))
    p_value = float(binom.sf(hits - 1, n, q_up))
    k_crit = int(binom.isf(v.alpha, n, q_up)) + 1  # smallest k with P(X >= k | q) <= alpha
    power = float(binom.sf(k_crit - 1, n, p_original)) if k_crit <= n else 0.0
    if not owner_forgotten:
        status = "not_requested"
    elif p_value < v.alpha:
        status = "fail"
    elif power < v.min_power:
        status = "inconclusive"
    else:
        status = "pass"
    return Verdict(
        status,
        hits,
        n,
        hits / max(1, n),
        q_hat,
        q_up,
        source,
        p_original,
        p_value,
        power,
        k_crit,
        v.alpha,
    )


def owner_hashes(manifest: dict) -> list[str]:
    """The verifying owner's sample-id hashes (the manifest keeps no raw ids of theirs, so
    nothing names them once they are forgotten): keyed (``"id_hash": "hmac-sha256"``) or, in a
    manifest from before keyed hashes, sha256("obliviate-sample:" + id)."""
    return list(manifest.get("verification", {}).get("owner_id_hashes", []))


def owners_present(cfg: Config, manifest: dict, exclude=()) -> list[str]:
    """The verifying owner's ids still in the blocks (minus ``exclude``), found by hashing every
    id of the index the way the manifest's owner hashes were made."""
    from obliviate.audit import ID_HASH, IdHasher, legacy_id_hash, manifest_key_ids
    from obliviate.requests import SampleIndex

    owners = set(owner_hashes(manifest))
    if not owners:
        return []
    if manifest.get("verification", {}).get("id_hash") == ID_HASH:
        hasher = IdHasher.existing(cfg, also=manifest_key_ids(manifest))  # raises without it
    else:
        hasher = legacy_id_hash
    gone = set(exclude)
    ids = [str(i) for i in SampleIndex.of(cfg.paths.blocks).ids]
    return [i for i in ids if i not in gone and hasher(i) in owners]


def measure_original(cfg: Config, theta: np.ndarray, trainer) -> dict:
    """Accuracy and backdoor rate of the freshly trained model, P_B before any deletion: the
    H1 rate of every later verification (the original itself does not survive a deletion)."""
    from obliviate.evaluate import accuracy
    from obliviate.partition import read_manifest

    out = {"accuracy": accuracy(trainer, theta, cfg), "backdoor_rate": None}
    if cfg.verify.enabled and owner_hashes(read_manifest(cfg.paths.blocks)):
        counts = hit_counts(cfg, trainer, theta)
        out |= {
            "backdoor_rate": counts["rate"],
            "backdoor_hits": counts["hits"],
            "backdoor_queries": counts["n"],
            "clean_hits": counts["clean_hits"],
        }
    return out


def original_metrics(cfg: Config) -> dict:
    path = cfg.paths.metrics / "original.json"
    if not path.is_file():
        raise StoreError(f"{path} is missing; it is written by `obliviate train` before deletions.")
    return json.loads(path.read_text())


def verify(
    cfg: Config, theta: np.ndarray | None = None, trainer=None, also_forgotten: tuple = ()
) -> dict:
    """The gate on ``theta`` (default: the served model); returns the verify metrics.

    ``also_forgotten``: ids a deletion in progress is about to forget (not yet in the audit).
    """
    from obliviate.partition import read_manifest
    from obliviate.store import ParamStore
    from obliviate.train import Trainer

    v = cfg.verify
    manifest = read_manifest(cfg.paths.blocks)
    owners = owner_hashes(manifest)
    if not v.enabled or not owners:  # nothing to verify is not a failure of the pipeline
        return {
            "status": "no_owner",
            "passed": True,
            "sentence": "no verifying owner was planted (set verify.owner_block and "
            "verify.owner_samples, then rerun `obliviate partition` and train): nothing to verify",
        }
    trainer = trainer or Trainer.from_config(cfg)
    if theta is None:
        from obliviate.fsck import preflight

        preflight(cfg)  # a damaged store or block stops it before a verdict is written
        store = ParamStore.open(cfg.paths.store)
        store.require_complete()
        theta = store.read(store.n_blocks)[0]
    counts = hit_counts(cfg, trainer, theta)
    original = original_metrics(cfg)
    if original.get("backdoor_rate") is None:
        raise StoreError(
            "the original model's backdoor rate was not measured; retrain with "
            "`obliviate train --overwrite` after planting the owner."
        )
    naive_counts = None
    naive_path = cfg.paths.naive_store
    if (naive_path / "zarr.json").is_file():
        naive = ParamStore.open(naive_path)
        if naive.completed == naive.n_blocks:
            naive_counts = hit_counts(cfg, trainer, naive.read(naive.n_blocks)[0])
    # forgotten: none of the owner's samples is left in the blocks (deletions are the only way
    # out of them, and each is audited)
    forgotten = not owners_present(cfg, manifest, exclude=also_forgotten)
    if v.q_source == "control":
        q_hits, q_n, source = counts["control_hits"], counts["n"], "control trigger"
    elif v.q_source == "naive" and naive_counts is None and not forgotten:
        # nothing to verify yet (dvc repro before any deletion): no naive model is needed
        q_hits, q_n, source = counts["clean_hits"], counts["n"], "clean behaviour, no naive model"
    elif v.q_source == "naive":
        if naive_counts is None:
            raise StoreError(
                "verify.q_source is naive but there is no naive model; "
                "run `obliviate retrain --naive` first."
            )
        q_hits, q_n, source = naive_counts["hits"], naive_counts["n"], "naive model"
    else:
        q_hits, q_n, source = counts["clean_hits"], counts["n"], "clean behaviour"
    # H1's rate enters the power calculation as a lower bound, mirroring q's upper bound
    p_low = clopper_pearson_lower(
        original["backdoor_hits"], original["backdoor_queries"], v.q_confidence
    )
    verdict = binomial_gate(counts["hits"], counts["n"], q_hits, q_n, p_low, v, source, forgotten)
    return {
        **asdict(verdict),
        "passed": verdict.passed,
        "sentence": verdict.sentence(),
        "owner_samples": len(owners),
        "owner_forgotten": forgotten,
        "rate_served": counts["rate"],
        "rate_original": original["backdoor_rate"],
        "rate_naive": None if naive_counts is None else naive_counts["rate"],
    }
