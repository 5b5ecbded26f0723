"""A thinned store (`train.store_every: s`): only P_0, P_B and every s-th row are written, and
every other row is rebuilt by replay, byte for byte what a store with s = 1 holds."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import FORGET, SMALL, Interrupted, crash_after, prepare, write_params

from obliviate import consolidation
from obliviate.config import load_config
from obliviate.deletion import forget
from obliviate.errors import StoreError
from obliviate.partition import load_block
from obliviate.rows import Rows
from obliviate.store import ParamStore
from obliviate.train import Trainer, stored_training


def bits(a) -> bytes:
    return np.ascontiguousarray(a, "<f4").tobytes()


def workspace(tmp_path, s: int, **train):
    cfg = load_config(
        write_params(tmp_path, **{**SMALL, "train": {**SMALL["train"], "store_every": s, **train}})
    )
    prepare(cfg)
    return cfg


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The s = 1 reference stores: with Adam's moments kept, and without optimizer state."""
    out = {}
    for keep in (True, False):
        cfg = workspace(tmp_path_factory.mktemp(f"full-{keep}"), 1, keep_optimizer_state=keep)
        out[keep] = (cfg, stored_training(cfg))
    return out


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("s", [2, 4, 7])
def test_every_row_of_a_thinned_store_reads_as_the_full_store_holds_it(full, tmp_path, s, keep):
    _, reference = full[keep]
    cfg = workspace(tmp_path, s, keep_optimizer_state=keep)
    store = stored_training(cfg)
    n = store.n_blocks  # 6
    kept = [k for k in range(n + 1) if k % s == 0 or k == n]
    assert store.kept_rows() == kept and store.meta["store_every"] == s
    # only the kept rows are on disk, and a plain zarr reader sees which (the attrs)
    assert sorted(int(p.name) for p in (cfg.paths.store / "params" / "c").iterdir()) == kept
    assert store.nbytes_stored() < reference.nbytes_stored() * (len(kept) + 1) / (n + 1)
    with pytest.raises(StoreError, match=r"row 1 is not one of them"):
        store.read(1) if 1 not in kept else (_ for _ in ()).throw(
            StoreError("row 1 is not one of them")
        )
    rows = Rows(store, Trainer.from_config(cfg))
    for k in [*range(n + 1), 3, 1]:  # in order, then back again (replayed from scratch)
        theta, opt = rows.read(k)
        want_theta, want_opt = reference.read(k)
        assert bits(theta) == bits(want_theta), k
        assert (opt is None) == (want_opt is None) and (opt is None or bits(opt) == bits(want_opt))


def test_thinned_training_resumes_after_an_interruption_to_the_same_bytes(full, tmp_path):
    _, reference = full[True]
    cfg = workspace(tmp_path, 4)
    with pytest.raises(Interrupted):
        stored_training(cfg, on_block=crash_after(5))
    assert ParamStore.open(cfg.paths.store).completed == 4  # the last kept row written
    store = stored_training(cfg)
    for k in (0, 4, 6):
        assert bits(store.read(k)[0]) == bits(reference.read(k)[0])
        assert bits(store.read(k)[1]) == bits(reference.read(k)[1])


def test_export_of_any_row_and_a_store_read_with_another_s(full, tmp_path):
    from safetensors.numpy import load_file

    ref_cfg, _ = full[True]
    cfg = workspace(tmp_path, 4)
    stored_training(cfg)

    def export(params, row, out):
        return subprocess.run(
            [sys.executable, "-m", "obliviate.cli", "export", "-o", str(out), "--row", str(row),
             "--params", str(params)], capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    for row in (3, 4):  # replayed, stored
        got = export(cfg.root / "params.yaml", row, tmp_path / f"thin{row}.safetensors")
        want = export(ref_cfg.root / "params.yaml", row, tmp_path / f"full{row}.safetensors")
        assert got.returncode == 0 and want.returncode == 0, got.stderr + want.stderr
        a, b = (load_file(tmp_path / f"{w}{row}.safetensors") for w in ("thin", "full"))
        assert a.keys() == b.keys() and all(bits(a[k]) == bits(b[k]) for k in a)
    # params.yaml changed to another s: one sentence, never a wrong model
    write_params(tmp_path, **{**SMALL, "train": {**SMALL["train"], "store_every": 2}})
    other = export(cfg.root / "params.yaml", 3, tmp_path / "other.safetensors")
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert "keeps every 4th row but params.yaml sets train.store_every: 2" in other.stderr
    assert not (tmp_path / "other.safetensors").exists()
    info = json.loads((cfg.paths.store / "params" / "zarr.json").read_text())
    assert info["attributes"]["obliviate"]["store_every"] == 4


# --------------------------------------------------------------------------- deletions


def all_rows(cfg) -> list[bytes]:
    """Every row P_k as read (stored or replayed) with its optimizer state, as bytes."""
    store = ParamStore.open(cfg.paths.store)
    reader = Rows(store, Trainer.from_config(cfg))
    return [b"".join(bits(a) for a in reader.read(k) if a is not None)
            for k in range(store.n_blocks + 1)]  # fmt: skip


CHAIN = {**FORGET, "prepare": {"blocks": 12}, "forget": {**FORGET["forget"],
         "max_accuracy_drop": None}}  # fmt: skip
# (block, position): stitched mid-store, then earlier (its P_{d-1} shifted), then inside the
# first one's retrained rows, then a prefix consolidation is not forced: a full one ends it
DELETIONS = [(5, 3), (2, 4), (7, 1), (3, 9)]


@pytest.fixture(scope="module")
def chain_reference(tmp_path_factory):
    """The s = 1 store after the chain of deletions: every row, each deletion's record."""
    return run_chain(tmp_path_factory.mktemp("chain-1"), 1)


def run_chain(ws, s: int):
    cfg = load_config(write_params(ws, **{**CHAIN, "train": {**CHAIN["train"], "store_every": s}}))
    prepare(cfg)
    stored_training(cfg)
    snapshots, records, pins = [all_rows(cfg)], [], set()
    for block, pos in DELETIONS:
        sid = str(load_block(cfg.paths.blocks, block).ids[pos])
        r = forget(cfg, [sid])
        records.append({k: r[k] for k in ("first_block", "stop_block", "deltas", "model_after")})
        snapshots.append(all_rows(cfg))
        pins |= set(ParamStore.open(cfg.paths.store).meta.get("pinned", []))
    consolidation.run(cfg)
    snapshots.append(all_rows(cfg))
    return cfg, snapshots, records, pins


@pytest.mark.slow
@pytest.mark.parametrize("s", [3, 5])
def test_a_chain_of_deletions_on_a_thinned_store_equals_the_full_store_byte_for_byte(
    chain_reference, tmp_path, s
):
    """Each deletion retrains the same rows, sees the same Deltas, stitches at the same block
    and serves the same bytes as at s = 1; every row, stored or replayed, after each deletion
    and after the consolidation, equals the full store's; and the store keeps only a few rows
    more than every s-th (the pins that keep shifted rows replayable)."""
    _, want_rows, want_records, _ = chain_reference
    cfg, got_rows, got_records, pins = run_chain(tmp_path, s)
    assert got_records == want_records
    stitched = [r for r in want_records if r["stop_block"] < CHAIN["prepare"]["blocks"]]
    assert stitched  # the chain exercises stitching and shifts, not only retrains to the end
    for step, (got, want) in enumerate(zip(got_rows, want_rows, strict=True)):
        differ = [k for k, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
        assert not differ, f"after step {step}: rows {differ} differ"
    assert pins  # shifted rows needed pins while the deletions were approximate
    store = ParamStore.open(cfg.paths.store)  # consolidated: exact, and the pins are gone
    thin = [k for k in range(store.n_blocks + 1) if k % s == 0 or k == store.n_blocks]
    assert store.kept_rows() == thin and store.meta["pinned"] == []
    on_disk = {int(p.name) for p in (cfg.paths.store / "params" / "c").iterdir()}
    assert on_disk == set(store.kept_rows())


FORGET_SCRIPT = """
import sys
from obliviate.config import load_config
from obliviate.deletion import forget
forget(load_config("params.yaml"), [sys.argv[1]])
"""
RECOVER_SCRIPT = """
from obliviate.config import load_config
from obliviate.deletion import drain
drain(load_config("params.yaml"))
"""


@pytest.fixture(scope="module")
def thinned_after_a_stitch(tmp_path_factory):
    """s = 3 after one stitched deletion (rows after it shifted, one pinned); the next deletion,
    at block 11, starts from a shifted row: it bakes the shift in and pins that row."""
    ws = tmp_path_factory.mktemp("thin-kill")
    cfg = load_config(write_params(ws, **{**CHAIN, "train": {**CHAIN["train"], "store_every": 3}}))
    prepare(cfg)
    stored_training(cfg)
    forget(cfg, [str(load_block(cfg.paths.blocks, 5).ids[3])])
    sid = str(load_block(cfg.paths.blocks, 11).ids[2])
    reference = tmp_path_factory.mktemp("thin-kill-ref") / "ws"
    shutil.copytree(ws, reference)
    ref_cfg = load_config(reference / "params.yaml")
    forget(ref_cfg, [sid])
    store = ParamStore.open(ref_cfg.paths.store)
    assert 10 in store.meta["pinned"] and store.shift_index(10) is None  # baked, then pinned
    return ws, sid, all_rows(ref_cfg)


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", ["during_retrain", "after_retrain", "before_commit", "after_store", "after_audit"]
)
def test_a_deletion_killed_on_a_thinned_store_recovers_to_the_same_bytes(
    thinned_after_a_stitch, tmp_path, point
):
    template, sid, want = thinned_after_a_stitch
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    env = {**os.environ, "OBLIVIATE_CRASH_AT": point}
    crashed = subprocess.run([sys.executable, "-c", FORGET_SCRIPT, sid], cwd=ws, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert crashed.returncode == -9, crashed.stderr
    subprocess.run([sys.executable, "-c", RECOVER_SCRIPT], cwd=ws, check=True, timeout=600,
                   capture_output=True)  # fmt: skip
    assert all_rows(load_config(ws / "params.yaml")) == want


def test_info_and_fsck_understand_a_thinned_store(tmp_path):
    cfg = workspace(tmp_path, 4)
    stored_training(cfg)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "obliviate.cli", *args, "--params",
                               str(cfg.root / "params.yaml")], capture_output=True, text=True,
                              timeout=600)  # fmt: skip

    info = json.loads(cli("info", "--json").stdout)
    assert info["store_every"] == 4 and info["kept_rows"] == 3  # rows 0, 4 and 6
    assert cli("fsck").returncode == 0  # the rows between are not missing: they replay
    chunk = next((cfg.paths.store / "params" / "c" / "4").iterdir())
    chunk.unlink()  # a kept row's chunk is
    broken = cli("fsck")
    assert (
        broken.returncode == 2
        and "row 4 of params has a missing chunk" in broken.stdout + broken.stderr
    )


@pytest.mark.slow
def test_the_accuracy_guard_judges_a_thinned_store_as_the_full_one(tmp_path):
    """With the guard on (params.yaml's forget.max_accuracy_drop), the same deletion on s = 1 and
    s = 4 is judged alike and leaves the same bytes."""
    out = []
    for s in (1, 4):
        (tmp_path / f"s{s}").mkdir()
        cfg = load_config(write_params(tmp_path / f"s{s}", **{**FORGET, "train": {
            **FORGET["train"], "store_every": s}}))  # fmt: skip
        prepare(cfg)
        stored_training(cfg)
        r = forget(cfg, [str(load_block(cfg.paths.blocks, 4).ids[7])])
        out.append((r["guard"], r["stop_block"], r["model_after"], all_rows(cfg)))
    assert out[0][0] is not None and out[0] == out[1]


@pytest.mark.slow
def test_a_prefix_consolidation_beside_a_deletion_on_a_thinned_store(tmp_path, monkeypatch):
    """A deletion lands while a consolidation computes; it starts from a shifted row, so it pins
    that row with the shift baked in. The consolidation installs the prefix up to that row
    (exact now: the pin goes, the row replays from exact rows) and pins the row after it; every
    row equals s = 1's after the prefix and after the end."""
    real = consolidation._compute
    out = []
    for s in (1, 3):
        (tmp_path / f"s{s}").mkdir()
        cfg = load_config(write_params(tmp_path / f"s{s}", **{**CHAIN, "train": {
            **CHAIN["train"], "store_every": s}}))  # fmt: skip
        prepare(cfg)
        stored_training(cfg)
        forget(cfg, [str(load_block(cfg.paths.blocks, 2).ids[4])])  # stitched: 7.. shifted
        snapshots = []

        def compute_then_delete(*args, cfg=cfg, snapshots=snapshots, **kwargs):
            snapshots.append(all_rows(cfg))  # before each compute: after the prefix, the 2nd
            real(*args, **kwargs)
            if len(snapshots) == 1:
                forget(cfg, [str(load_block(cfg.paths.blocks, 11).ids[2])])

        monkeypatch.setattr(consolidation, "_compute", compute_then_delete)
        result = consolidation.consolidate(cfg)
        assert len(result.partial) == 1
        out.append((snapshots, all_rows(cfg)))
    assert out[0] == out[1]
