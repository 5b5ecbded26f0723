"""Deletions through the plain-Python path (no Prefect, no DVC): the method's invariants."""

import hashlib

import numpy as np
import pytest

from obliviate.audit import IdHasher, read_records
from obliviate.deletion import forget, model_hash
from obliviate.errors import RequestError
from obliviate.partition import load_block, read_manifest
from obliviate.requests import SampleIndex
from obliviate.store import ParamStore
from obliviate.train import Trainer, stored_training


def rows(cfg):
    store = ParamStore.open(cfg.paths.store)
    return [store.read(k) for k in range(store.n_blocks + 1)]


def test_single_deletion_retrains_stitches_and_keeps_the_store_consistent(trained):
    cfg = trained
    before = rows(cfg)
    sid = str(load_block(cfg.paths.blocks, 4).ids[7])
    r = forget(cfg, [sid])
    d, stop, B = r["first_block"], r["stop_block"], cfg.prepare.blocks
    after = rows(cfg)
    assert d == 4 and r["blocks"] == [4] and len(r["deltas"]) == stop - d + 1
    assert cfg.forget.min_blocks <= stop - d + 1 <= cfg.forget.max_blocks
    # rows before the deleted block are untouched
    for k in range(d):
        assert np.array_equal(after[k][0], before[k][0])
    # the retrained rows replay exactly from their predecessors on the reduced blocks
    trainer = Trainer.from_config(cfg)
    for k in range(d, stop + 1):
        theta, opt = trainer.run_block(k, *after[k - 1])
        assert np.array_equal(theta.numpy(), after[k][0]), f"P'_{k} does not replay"
        assert np.array_equal(opt.numpy(), after[k][1]), f"optimizer state {k} does not replay"
    # stitching: M' = P'_stop + (P_B - P_stop), and every later row moved by the same shift
    shift = after[stop][0].astype(np.float64) - before[stop][0]
    want = (before[B][0].astype(np.float64) + shift).astype(np.float32)
    assert np.array_equal(after[B][0], want)
    assert r["model_after"] == model_hash(after[B][0])
    for k in range(stop + 1, B):
        np.testing.assert_allclose(after[k][0], before[k][0] + shift, rtol=0, atol=1e-6)
    # the sample is gone from the blocks and the manifest agrees with the files
    assert sid not in set(SampleIndex.of(cfg.paths.blocks).ids)
    cached, scanned = SampleIndex.of(cfg.paths.blocks), SampleIndex.scan(cfg.paths.blocks)
    assert sorted(zip(cached.ids, cached.block, strict=True)) == sorted(
        zip(scanned.ids, scanned.block, strict=True)
    )
    manifest = read_manifest(cfg.paths.blocks)
    block_file = cfg.paths.blocks / "block_0004.npz"
    assert manifest["blocks"][3]["sha256"] == hashlib.sha256(block_file.read_bytes()).hexdigest()
    assert manifest["n_samples"] == sum(
        len(load_block(cfg.paths.blocks, k).ids) for k in range(1, B + 1)
    )
    # the audit holds a hash, not the id
    (record,) = read_records(cfg.paths.audit)
    assert record["sample_id_hashes"] == [IdHasher.of(cfg)(sid)]
    assert record["id_hash"] == "hmac-sha256" and record["id_key"] == IdHasher.of(cfg).key_id
    assert sid not in cfg.paths.audit.read_text()
    from obliviate.deletion import report

    assert report(cfg, r).stat().st_size > 1000  # a PNG drawn from the record
    # the store still counts as built from these params and blocks: training has nothing to do
    assert ParamStore.open(cfg.paths.store).completed == B
    assert np.array_equal(stored_training(cfg).read(B)[0], after[B][0])


def test_second_deletion_behaves_like_the_first(trained):
    cfg = trained
    first = forget(cfg, [str(load_block(cfg.paths.blocks, 2).ids[0])])
    later = first["stop_block"] + 1
    assert later < cfg.prepare.blocks  # max_blocks keeps the first sweep short of the end
    before = rows(cfg)
    sid = str(load_block(cfg.paths.blocks, later).ids[0])
    second = forget(cfg, [sid])
    after = rows(cfg)
    assert second["first_block"] == later
    trainer = Trainer.from_config(cfg)
    # The sweep started from P_{d-1} as the consistent store defines it (shifted by the first
    # deletion) and trained the reduced block: replaying that gives the stored row exactly.
    theta, _ = trainer.run_block(later, *before[later - 1])
    assert np.array_equal(theta.numpy(), after[later][0])
    assert not np.array_equal(after[later][0], before[later][0])
    assert len(read_records(cfg.paths.audit)) == 2
    assert np.array_equal(after[later - 1][0], before[later - 1][0])


def test_multi_block_request_is_one_sweep_from_the_earliest_block(trained):
    cfg = trained
    ids = [str(load_block(cfg.paths.blocks, k).ids[0]) for k in (3, 5)]
    r = forget(cfg, ids)
    assert r["first_block"] == 3 and r["last_affected_block"] == 5 and r["blocks"] == [3, 5]
    # the stop rule only starts at the last affected block, and needs min_blocks points there
    assert r["stop_block"] >= 5 + cfg.forget.min_blocks - 1
    assert len(r["deltas"]) == r["stop_block"] - 3 + 1
    index = set(SampleIndex.of(cfg.paths.blocks).ids)
    assert not set(ids) & index


def test_refused_request_changes_nothing(trained):
    cfg = trained

    def snapshot():
        files = sorted(
            p for p in cfg.root.rglob("*") if p.is_file() and ".obliviate" not in p.parts
        )
        return {p: p.read_bytes() for p in files}

    before = snapshot()
    with pytest.raises(RequestError, match="unknown sample id"):
        forget(cfg, ["digits:424242"])
    assert snapshot() == before


def test_the_accuracy_guard_retrains_further_until_it_accepts(trained):
    from obliviate.deletion import stop_rule
    from obliviate.forget import sweep

    cfg = trained
    store = ParamStore.open(cfg.paths.store)
    trainer = Trainer.from_config(cfg)
    plan = {3: [str(load_block(cfg.paths.blocks, 3).ids[1])]}
    free = sweep(trainer, store, plan, stop_rule(cfg))
    assert free.stop < store.n_blocks and free.guard_rejections == 0
    seen = []

    def refuse_once(served):
        seen.append(served)
        return len(seen) > 1

    guarded = sweep(trainer, store, plan, stop_rule(cfg), accept=refuse_once)
    # judged at the free stop (refused), then again 2 blocks later (accepted)
    assert free.stop + 2 < store.n_blocks
    assert guarded.stop == free.stop + 2 and guarded.guard_rejections == 1 and len(seen) == 2
    assert np.array_equal(guarded.thetas[: len(free.thetas)], free.thetas)  # same retraining
    old_stop = store.read(guarded.stop)[0].astype(np.float64)
    final = store.read(store.n_blocks)[0].astype(np.float64)
    shift = guarded.thetas[-1].astype(np.float64) - old_stop
    assert np.array_equal(guarded.shift, shift)  # what the store will add to later rows
    expected = (final + shift).astype(np.float32)  # P'_stop + (P_B - P_stop)
    assert np.array_equal(guarded.served, expected) and np.array_equal(seen[-1], expected)
    assert np.array_equal(seen[0], free.served)  # the guard judged the stitched model
    never = sweep(trainer, store, plan, stop_rule(cfg), accept=lambda served: False)
    assert never.stop == store.n_blocks and never.reason == "end_of_store"
    assert np.array_equal(never.served, never.thetas[-1]) and never.shift is None


def test_the_guard_retrains_past_a_stitch_that_loses_accuracy(trained):
    from obliviate.deletion import accuracy_guard, stop_rule
    from obliviate.forget import sweep

    cfg = trained.model_copy(update={"forget": trained.forget.model_copy(
        update={"max_accuracy_drop": 0.0})})  # fmt: skip
    block = load_block(cfg.paths.blocks, 2)
    _, keep = np.unique(block.y, return_index=True)  # the first sample of every class stays
    plan = {2: [str(i) for j, i in enumerate(block.ids) if j not in set(keep)]}
    store = ParamStore.open(cfg.paths.store)
    trainer = Trainer.from_config(cfg)
    accept = accuracy_guard(cfg, trainer, plan, store.read(store.n_blocks)[0])
    free = sweep(trainer, store, plan, stop_rule(cfg))
    assert not accept(free.served)  # almost all of block 2: the plain stitch loses accuracy
    guarded = sweep(trainer, store, plan, stop_rule(cfg), accept=accept)
    assert guarded.stop > free.stop and guarded.guard_rejections >= 1
    assert guarded.stop == store.n_blocks or accept(guarded.served)  # what it serves passes
    r = forget(cfg, plan[2])  # and the deletion path uses it and audits the refusals
    assert r["stop_block"] == guarded.stop and r["guard_rejections"] == guarded.guard_rejections
