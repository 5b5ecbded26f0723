"""Deletions through the plain-Python path (no Prefect, no DVC): the method's invariants."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from obliviate import lifecycle
from obliviate.audit import IdHasher, read_records
from obliviate.deletion import forget
from obliviate.errors import RequestError
from obliviate.guard import StitchVerdict
from obliviate.hashing import model_hash
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


def verdict(accepted: bool) -> StitchVerdict:
    return StitchVerdict(accepted, 0.9, 0.9, 0.0, 0.0, 10)


def test_the_accuracy_guard_retrains_further_until_it_accepts(trained):
    from obliviate.deletion import stop_rule
    from obliviate.sweep import sweep

    cfg = trained
    store = ParamStore.open(cfg.paths.store)
    trainer = Trainer.from_config(cfg)
    plan = {3: [str(load_block(cfg.paths.blocks, 3).ids[1])]}
    free_rows, rows_ = {}, {}
    free = sweep(trainer, store, plan, stop_rule(cfg), put=lambda k, t, o: free_rows.update({k: t}))
    assert free.stop < store.n_blocks and free.guard_rejections == 0
    assert sorted(free_rows) == list(range(3, free.stop + 1))  # every retrained row, once
    seen = []

    def refuse_once(served):
        seen.append(served)
        return verdict(len(seen) > 1)

    guarded = sweep(
        trainer, store, plan, stop_rule(cfg), refuse_once, lambda k, t, o: rows_.update({k: t})
    )
    # judged at the free stop (refused), then again 2 blocks later (accepted)
    assert free.stop + 2 < store.n_blocks
    assert guarded.stop == free.stop + 2 and guarded.guard_rejections == 1 and len(seen) == 2
    assert guarded.verdict.accepted
    for k, theta in free_rows.items():  # the same retraining
        assert np.array_equal(rows_[k], theta)
    old_stop = store.read(guarded.stop)[0].astype(np.float64)
    final = store.read(store.n_blocks)[0].astype(np.float64)
    shift = rows_[guarded.stop].astype(np.float64) - old_stop
    assert np.array_equal(guarded.shift, shift)  # what the store will add to later rows
    expected = (final + shift).astype(np.float32)  # P'_stop + (P_B - P_stop)
    assert np.array_equal(guarded.served, expected) and np.array_equal(seen[-1], expected)
    assert np.array_equal(seen[0], free.served)  # the guard judged the stitched model
    rows_.clear()
    never = sweep(
        trainer,
        store,
        plan,
        stop_rule(cfg),
        lambda s: verdict(False),
        lambda k, t, o: rows_.update({k: t}),
    )
    assert never.stop == store.n_blocks and never.reason == "end_of_store"
    assert np.array_equal(never.served, rows_[store.n_blocks]) and never.shift is None


def test_the_deletion_judges_m_prime_once_on_the_validation_split(trained):
    from obliviate.guard import Guard

    cfg = trained
    manifest = read_manifest(cfg.paths.blocks)
    val = load_block(cfg.paths.blocks, 0)
    assert manifest["validation"]["n"] == len(val) > 0
    assert not set(val.ids) & {i for k in range(1, cfg.prepare.blocks + 1)
                               for i in load_block(cfg.paths.blocks, k).ids}  # fmt: skip
    counts = np.bincount(val.y)
    assert counts.max() - counts.min() <= 1  # label-balanced (digits' classes are near equal)
    store = ParamStore.open(cfg.paths.store)
    ref = store.meta["reference"]  # the original's validation predictions, kept at training
    r = forget(cfg, [str(load_block(cfg.paths.blocks, 5).ids[0])])
    g = r["guard"]
    assert g["reference_accuracy"] == pytest.approx(ref["val_accuracy"])
    served = ParamStore.open(cfg.paths.store).read_params(cfg.prepare.blocks)
    again = Guard(cfg, Trainer.from_config(cfg), ParamStore.open(cfg.paths.store)).judge(served)
    assert again.as_dict() == g and r["val_accuracy_after"] == g["accuracy"]
    assert g["accepted"] or r["reason"] == "end_of_store"


def test_forgetting_a_validation_sample_retrains_nothing(trained):
    cfg = trained
    before = rows(cfg)
    val = load_block(cfg.paths.blocks, 0)
    sid = str(val.ids[3])
    r = forget(cfg, [sid])
    assert r["blocks"] == [0] and r["retrained_blocks"] == 0 and r["reason"] == "validation_only"
    after = rows(cfg)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(after, before, strict=True))
    left = load_block(cfg.paths.blocks, 0)
    assert sid not in set(left.ids) and len(left) == len(val) - 1
    assert read_manifest(cfg.paths.blocks)["validation"]["n"] == len(left)
    assert sid not in set(SampleIndex.of(cfg.paths.blocks).ids)
    with pytest.raises(RequestError, match="already forgotten"):
        forget(cfg, [sid])


def test_stitching_shifts_are_compacted_one_per_row(trained):
    cfg = trained
    B = cfg.prepare.blocks
    for k in (4, 1, 2):  # later sweeps end inside earlier shifts' ranges: they must merge
        before = rows(cfg)
        r = forget(cfg, [str(load_block(cfg.paths.blocks, k).ids[0])])
        after = rows(cfg)
        shift = after[r["stop_block"]][0].astype(np.float64) - before[r["stop_block"]][0]
        for j in range(r["stop_block"] + 1, B):  # every later row moved by this shift
            np.testing.assert_allclose(after[j][0], before[j][0] + shift, rtol=0, atol=1e-5)
        for j in range(k):
            assert np.array_equal(after[j][0], before[j][0])
    meta = ParamStore.open(cfg.paths.store).meta
    covering = [sum(lo <= j <= hi for s in meta["shifts"] for lo, hi in s["ranges"])
                for j in range(B + 1)]  # fmt: skip
    assert max(covering) == 1  # a read adds at most one shift
    assert len(meta["shifts"]) <= 3


def test_the_planner_groups_close_blocks_and_splits_far_ones():
    from obliviate.deletion import plan_sweeps

    plan = {0: ["v"], 3: ["a"], 5: ["b"], 9: ["c"], 30: ["d"], 33: ["e"]}
    assert plan_sweeps(plan, tail=4) == [
        {0: ["v"], 3: ["a"], 5: ["b"], 9: ["c"]},  # gaps 2 and 4: cheaper inside one sweep
        {30: ["d"], 33: ["e"]},  # a gap of 21 costs more than another sweep's tail
    ]
    assert plan_sweeps(plan, tail=30) == [plan]
    assert plan_sweeps({0: ["v"]}, tail=4) == [{0: ["v"]}]


def test_far_apart_blocks_are_forgotten_as_planned_sweeps(trained, tmp_path):
    import shutil

    from obliviate.config import load_config

    cfg = trained
    twin = tmp_path / "twin"
    shutil.copytree(cfg.root, twin)
    one_by_one = load_config(twin / "params.yaml")
    ids = [str(load_block(cfg.paths.blocks, k).ids[0]) for k in (1, 11)]
    r = forget(cfg, ids)  # gap 10 > the expected tail (min_blocks 4): two sweeps
    assert [s["blocks"] for s in r["sweeps"]] == [[1], [11]]
    records = read_records(cfg.paths.audit)
    assert [x["request_id"] for x in records] == [s["request_id"] for s in r["sweeps"]]
    assert all(x["sweep_plan"]["sweeps"] == [[1], [11]] for x in records)
    assert sum(s["retrained_blocks"] for s in r["sweeps"]) < cfg.prepare.blocks
    (request,) = lifecycle.entries(cfg)
    assert request["status"] == "done" and request["deletion"] == r["deletion"]
    for sid in ids:  # the same as two requests one after the other, bit for bit
        forget(one_by_one, [sid])
    got, want = rows(cfg), rows(one_by_one)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(got, want, strict=True))


def test_a_crash_between_planned_sweeps_resumes_with_the_rest(trained):
    import os
    import subprocess
    import sys

    from obliviate.deletion import drain

    cfg = trained
    ids = [str(load_block(cfg.paths.blocks, k).ids[0]) for k in (1, 11)]
    script = "import sys; from obliviate.config import load_config; from obliviate.deletion "
    script += "import forget; forget(load_config(sys.argv[1]), sys.argv[2:], refresh=False)"
    env = {**os.environ, "OBLIVIATE_CRASH_AT": "after_commit"}  # after the first sweep landed
    crashed = subprocess.run([sys.executable, "-c", script, str(cfg.root / "params.yaml"), *ids],
                             env=env, capture_output=True, text=True)  # fmt: skip
    assert crashed.returncode == -9, crashed.stderr
    assert len(read_records(cfg.paths.audit)) == 1  # the first sweep is in
    (entry,) = lifecycle.entries(cfg)
    assert entry["status"] == "running"  # the request is not finished: its last sweep is not in
    out = drain(cfg, refresh=False)  # what `obliviate drain` (or the next forget) runs first
    assert out.recovered == [f"{entry['deletion']}-b1", entry["deletion"]]
    (request,) = lifecycle.entries(cfg)
    assert out.done == [request] and request["status"] == "done"  # reported done, once
    assert request["deletion"] == entry["deletion"] and "ids" not in request
    records = read_records(cfg.paths.audit)
    assert [x["blocks"] for x in records] == [[1], [11]]  # the rest, once; nothing redone
    index = set(SampleIndex.of(cfg.paths.blocks).ids)
    assert not set(ids) & index


def test_the_guard_never_judges_on_validation_samples_that_leave(trained):
    cfg = trained
    val = load_block(cfg.paths.blocks, 0)
    ids = [str(val.ids[0]), str(load_block(cfg.paths.blocks, 5).ids[0])]
    r = forget(cfg, ids)
    assert r["guard"]["n"] == len(val) - 1  # judged on the split without the leaving sample
    ref = ParamStore.open(cfg.paths.store).meta["reference"]["val_predictions"]
    assert ref[int(val.slot[0])] == -1  # its original prediction is dropped too
    assert all(p >= 0 for i, p in enumerate(ref) if i != int(val.slot[0]))


def test_a_request_that_cannot_run_here_is_refused_before_the_journal(trained):
    from obliviate.errors import ObliviateError

    cfg = trained.model_copy(update={"train": trained.train.model_copy(update={"device": "cuda"})})
    sid = str(load_block(cfg.paths.blocks, 4).ids[0])
    with pytest.raises(ObliviateError, match="cuda"):
        forget(cfg, [sid])
    assert lifecycle.entries(cfg) == []  # nothing journaled: withdrawn
    assert forget(trained, [sid])["blocks"] == [4]  # and nothing left to block the next one


def test_forget_again_after_a_crash_reports_the_deletion_that_recovery_finished(trained):
    import os
    import subprocess
    import sys

    cfg = trained
    sid = str(load_block(cfg.paths.blocks, 4).ids[0])
    script = "import sys; from obliviate.config import load_config; from obliviate.deletion "
    script += "import forget; forget(load_config(sys.argv[1]), sys.argv[2:], refresh=False)"
    env = {**os.environ, "OBLIVIATE_CRASH_AT": "after_retrain"}  # journaled, nothing applied
    crashed = subprocess.run([sys.executable, "-c", script, str(cfg.root / "params.yaml"), sid],
                             env=env, capture_output=True, text=True)  # fmt: skip
    assert crashed.returncode == -9, crashed.stderr
    assert read_records(cfg.paths.audit) == []
    r = forget(cfg, [sid], refresh=False)  # the user runs the same command again
    (record,) = read_records(cfg.paths.audit)  # one deletion: the recovered one, not a second
    assert r["request_id"] == record["request_id"] and r["blocks"] == [4]
    (request,) = lifecycle.entries(cfg)  # the retry joined the killed request: finished once
    assert request["status"] == "done" and request["deletion"] == record["request_id"]


def test_fsck_names_a_committed_staged_deletion_as_pending(trained):
    import os
    import subprocess
    import sys

    from obliviate.fsck import check

    cfg = trained
    script = "import sys; from obliviate.config import load_config; from obliviate.deletion "
    script += "import forget; forget(load_config(sys.argv[1]), sys.argv[2:], refresh=False)"
    sid = str(load_block(cfg.paths.blocks, 4).ids[0])
    env = {**os.environ, "OBLIVIATE_CRASH_AT": "after_store"}  # staged and half applied
    crashed = subprocess.run([sys.executable, "-c", script, str(cfg.root / "params.yaml"), sid],
                             env=env, capture_output=True, text=True)  # fmt: skip
    assert crashed.returncode == -9, crashed.stderr
    problems = check(cfg)
    assert any("is staged but not applied" in p for p in problems), problems
    assert not any("remove the folder" in p for p in problems)


def test_a_held_lock_names_its_holder_and_a_refused_forget_leaves_nothing(trained, capfd):
    import os

    from obliviate.transaction import LockError, State

    cfg = trained
    sid = str(load_block(cfg.paths.blocks, 4).ids[0])

    def files():
        return {p.relative_to(cfg.root): p.read_bytes() for p in cfg.root.rglob("*") if p.is_file()}

    before = files()
    with State.of(cfg).lock():  # another writer, e.g. a long deletion
        for wait, said in ((0, "holds the writer lock"), (0.3, "still holds the writer lock")):
            with pytest.raises(LockError, match=said) as refused:
                forget(cfg, [sid], wait=wait)
            assert f"pid {os.getpid()}" in str(refused.value) and sid not in str(refused.value)
            assert "--wait" in str(refused.value)
    assert "waiting up to 0.3 s for" in capfd.readouterr().err  # visible while it waits
    after = files()
    after.pop(Path(".obliviate/writer.lock"))
    assert after == before  # byte-identical: the request withdrawn, nothing journaled
    assert read_records(cfg.paths.audit) == []


def test_the_lock_holder_is_named_by_its_command_never_its_arguments(monkeypatch):
    from obliviate.transaction import _command

    monkeypatch.setattr("sys.argv", ["/venv/bin/obliviate", "forget", "digits:5", "digits:6"])
    assert _command() == "obliviate forget"
    monkeypatch.setattr("sys.argv", ["-c", "digits:5"])  # python -c SCRIPT ID
    assert _command() == "python"
