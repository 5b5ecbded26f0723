"""`obliviate verify`: the verification gate (``obliviate.gate``) on the served model of this
workspace, against the original model's backdoor rate (metrics/original.json) and, where it
exists, the naive model. The trigger is planted at partition time (``obliviate.trigger``)."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from obliviate.config import Config
from obliviate.errors import ObliviateError, StoreError
from obliviate.gate import binomial_gate, clopper_pearson_lower, hit_counts, owner_hashes


class VerificationFailed(ObliviateError):
    """The gate did not find the deletion supported."""


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
        theta = store.read_params(store.n_blocks)
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
            naive_counts = hit_counts(cfg, trainer, naive.read_params(naive.n_blocks))
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
