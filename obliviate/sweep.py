"""The deletion sweep (paper Algorithm 1): retrain with the residual-memory stop, then stitch.

``sweep`` changes nothing in the workspace: it reads the store and the blocks, hands each
retrained row to ``put`` as soon as it exists (the transaction streams it to staging, so memory
stays O(|theta|) however long the sweep runs) and returns the new blocks and the stitched model.
``obliviate.transaction`` makes them durable atomically.

For a request touching blocks d <= ... <= d_last, one sweep starts from P_{d-1} and removes each
sample when its block is reached; the stop rule looks at Delta from d_last on (x = 1 at d_last).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from obliviate.data import Samples
from obliviate.faults import crashpoint
from obliviate.guard import StitchVerdict
from obliviate.partition import load_block
from obliviate.rows import Rows
from obliviate.stoprule import StopRule
from obliviate.store import ParamStore
from obliviate.train import Trainer


@dataclass
class Sweep:
    first: int  # d: the first affected block
    last_affected: int  # d_last
    stop: int  # d + t: the last retrained block
    deltas: list[float]  # Delta_k for k = d..stop
    fits: list[dict]  # per step from d_last on: n, h, a, b, slope
    reason: str  # why retraining stopped
    guard_rejections: int  # stops the accuracy guard refused (each cost one more block)
    served: np.ndarray  # M' = P'_stop + (P_B - P_stop), float32
    shift: np.ndarray | None  # P'_stop - P_stop (float64); None when stop == B
    new_blocks: dict[int, Samples] = field(default_factory=dict)
    pins: list[int] = field(default_factory=list)  # rows a thinned store keeps from now on
    unshift: list[int] = field(default_factory=list)  # rows whose shift is now in the row
    verdict: StitchVerdict | None = None  # the guard's judgement of the served M', if it judged it
    train_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def t(self) -> int:
        return self.stop - self.first

    def summary(self) -> dict:
        return {
            "first_block": self.first,
            "last_affected_block": self.last_affected,
            "stop_block": self.stop,
            "t": self.t,
            "retrained_blocks": self.stop - self.first + 1,
            "reason": self.reason,
            "guard_rejections": self.guard_rejections,
            "guard": None if self.verdict is None else self.verdict.as_dict(),
            "deltas": self.deltas,
            "fits": self.fits,
            "train_seconds": self.train_seconds,
            "total_seconds": self.total_seconds,
        }


def l1_update_distance(old_prev, old_cur, new_prev, new_cur) -> float:
    """Delta_k = ||(P_k - P_{k-1}) - (P'_k - P'_{k-1})||_1, in float64."""
    f = np.float64
    return float(np.abs((old_cur.astype(f) - old_prev) - (new_cur.astype(f) - new_prev)).sum())


def stitch(final: np.ndarray, new_stop: np.ndarray, old_stop: np.ndarray) -> np.ndarray:
    """M' = P'_stop + (P_B - P_stop), computed in float64."""
    f = np.float64
    return (final.astype(f) + (new_stop.astype(f) - old_stop)).astype(np.float32)


def sweep(
    trainer: Trainer,
    store: ParamStore,
    plan: dict[int, list[str]],
    rule: StopRule,
    judge: Callable[[np.ndarray], StitchVerdict] | None = None,
    put: Callable[[int, np.ndarray, np.ndarray | None], None] = lambda k, theta, opt: None,
    extend: bool = True,
) -> Sweep:
    """Retrain from the first affected block until the stop rule fires; stitch M'.

    ``plan`` maps blocks 1..B to the ids leaving them (block 0, the validation split, is not
    trained on and is the caller's business). ``put(k, P'_k, state)`` receives each retrained
    row once. ``judge(M')``, the accuracy guard, may refuse a stop: retraining then goes on and
    the guard judges again 2, 4, 8, ... blocks later (so a long extension costs O(log)
    evaluations) until it accepts or the store ends (where M' is the retrained model itself).
    With ``extend`` False (forget.on_refusal: consolidate) a refused stitch is served all the
    same: the sweep stops, and its ``verdict`` says the guard refused it.
    """
    start = time.perf_counter()
    first, last, n_blocks = min(plan), max(plan), store.n_blocks
    original = Rows(store, trainer)  # the run as stored: kept rows, or replayed between them
    new_prev, opt = original.read(first - 1)
    old_prev = new_prev
    # A thinned store replays a row from the kept row below it, unshifted. If P_{d-1} is shifted,
    # the retrained rows start from its shifted value: that row is kept from now on, shift baked in.
    bake = store.store_every > 1 and store.shift_index(first - 1) is not None
    start_row = (new_prev, opt) if bake else None
    final = store.read_params(n_blocks)
    deltas, fits, new_blocks, verdict = [], [], {}, None
    train_s, reason, k, rejections, next_check = 0.0, "end_of_store", first, 0, 0
    for k in range(first, n_blocks + 1):
        block = load_block(trainer.blocks_dir, k)
        if k in plan:
            block = block.take(~np.isin(block.ids, plan[k]))
            new_blocks[k] = block
        t0 = time.perf_counter()
        theta, opt = trainer.train_samples(k, new_prev, opt, block)
        train_s += time.perf_counter() - t0
        theta, opt = theta.numpy(), None if opt is None else opt.numpy()
        old_cur = original.read_params(k)  # the original run's optimizer state is not needed
        deltas.append(l1_update_distance(old_prev, old_cur, new_prev, theta))
        if store.is_kept(k):  # train.store_every: the other rows replay from the kept ones
            put(k, theta, opt)
        crashpoint("during_retrain")
        new_prev, old_prev = theta, old_cur
        if k >= last:
            stop, why, fit = rule.decide(deltas[last - first :])
            if fit is not None:
                fits.append({"n": k - last + 1, **asdict(fit)})
            if stop and k < n_blocks and judge:
                if k < next_check:  # after a refusal, judge again at doubling distances
                    continue
                verdict = judge(stitch(final, theta, old_cur))
                if not verdict.accepted and not extend:
                    rejections += 1  # served all the same: a consolidation follows
                elif not verdict.accepted:
                    rejections += 1  # the stitched model lost too much: retrain further
                    next_check = k + 2**rejections
                    verdict = None
                    continue
            if stop:
                reason = why
                break
    stop_k = k
    if stop_k == n_blocks and rejections:
        reason = "end_of_store"  # the guard refused every stitch: M' is the retrained model
    if stop_k == n_blocks:
        served, shift = new_prev, None
    else:
        shift = new_prev.astype(np.float64) - old_prev.astype(np.float64)
        served = stitch(final, new_prev, old_prev)
    pins, unshift = [], []
    if bake:
        put(first - 1, *start_row)
        pins, unshift = [first - 1], [first - 1]
    after = stop_k + 1  # the first shifted row must replay from an unchanged row: keep it as run
    if shift is not None and after < n_blocks and not store.is_kept(after):
        put(after, *original.raw(after))
        pins.append(after)
    return Sweep(
        pins=[k for k in pins if not store.is_kept(k)],
        unshift=unshift,
        first=first,
        last_affected=last,
        stop=stop_k,
        deltas=deltas,
        fits=fits,
        reason=reason,
        guard_rejections=rejections,
        served=served,
        shift=shift,
        new_blocks=new_blocks,
        verdict=verdict,
        train_seconds=train_s,
        total_seconds=time.perf_counter() - start,
    )
