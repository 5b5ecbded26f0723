"""The verification gate: does the verifying owner's backdoor (``obliviate.trigger``) still work?

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

from dataclasses import dataclass

import numpy as np

from obliviate.config import Config, VerifyConfig
from obliviate.data import Samples
from obliviate.partition import load_samples, read_manifest
from obliviate.predict import accuracy, majority_rate, predict
from obliviate.trigger import apply_trigger, control_trigger


def queries(test: Samples, v: VerifyConfig, seed: int) -> np.ndarray:
    """Indices of up to n test samples whose true class is not the target (seeded choice)."""
    pool = np.flatnonzero(test.y != v.target)
    return np.sort(np.random.default_rng([seed, 7]).permutation(pool)[: v.queries])


def hit_counts(cfg: Config, trainer, theta: np.ndarray) -> dict:
    """Target predictions on the query inputs: triggered, clean, and with the control trigger."""
    test = load_samples(cfg.paths.test)
    q = queries(test, cfg.verify, cfg.prepare.seed)
    control = control_trigger(cfg.verify, test.x.shape[1] if test.x.ndim == 2 else None)

    def hits(x: np.ndarray) -> int:
        labels = predict(trainer, theta, x, cfg.evaluate.batch_size)
        return int((labels == cfg.verify.target).sum())

    n_hits = hits(apply_trigger(test.x[q], trainer.info, cfg.verify))
    return {
        "hits": n_hits,
        "clean_hits": hits(test.x[q]),
        "control_hits": hits(apply_trigger(test.x[q], trainer.info, control)),
        "n": len(q),
        "rate": n_hits / max(1, len(q)),
    }


@dataclass(frozen=True)
class GateVerdict:
    """The gate's judgement of one model (the accuracy guard's is ``guard.StitchVerdict``)."""

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
) -> GateVerdict:
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
    return GateVerdict(
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


def measure_original(cfg: Config, theta: np.ndarray, trainer) -> dict:
    """Accuracy and backdoor rate of the freshly trained model, P_B before any deletion: the
    H1 rate of every later verification (the original itself does not survive a deletion)."""
    test = load_samples(cfg.paths.test)
    out = {"accuracy": accuracy(trainer, theta, test, cfg.evaluate.batch_size),
           "majority_rate": majority_rate(test.y), "n_test": len(test),
           "backdoor_rate": None}  # fmt: skip
    if cfg.verify.enabled and owner_hashes(read_manifest(cfg.paths.blocks)):
        counts = hit_counts(cfg, trainer, theta)
        out |= {
            "backdoor_rate": counts["rate"],
            "backdoor_hits": counts["hits"],
            "backdoor_queries": counts["n"],
            "clean_hits": counts["clean_hits"],
        }
    return out
