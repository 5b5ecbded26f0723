"""Exact by a deadline: the exact rows of the store, consolidation to the naive model bit for
bit, and the auditor's replay, on the default recipe (Adam with its moments kept, the cosine
schedule, the validation split) shrunk to digits and 12 blocks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import MANUAL_CONSOLIDATION, prepare, write_params

from obliviate import consolidation, lifecycle
from obliviate.audit import read_records
from obliviate.compare import naive_config
from obliviate.config import load_config
from obliviate.deletion import drain, forget
from obliviate.partition import load_block
from obliviate.replay import replay
from obliviate.store import ParamStore
from obliviate.train import Trainer, stored_training

# the default recipe; fewer blocks, and a stop rule that stops well before the end
EXACT = {"prepare": {"blocks": 12}, "forget": {"min_blocks": 4, "max_blocks": 8},
         "consolidate": MANUAL_CONSOLIDATION}  # fmt: skip


pytest_plugins = ["e2e"]  # the session's DVC + git template, for the test through the CLI


@pytest.fixture(scope="module")
def trained_exact(tmp_path_factory):
    ws = tmp_path_factory.mktemp("exact")
    cfg = load_config(write_params(ws, **EXACT))
    prepare(cfg)
    stored_training(cfg)
    return ws


@pytest.fixture
def cfg(trained_exact, tmp_path):
    shutil.copytree(trained_exact, tmp_path / "ws")
    return load_config(tmp_path / "ws" / "params.yaml")


def rows(path) -> list[tuple[bytes, bytes]]:
    """Every row of a store as its stored bytes (P_k as read, and its optimizer state)."""
    store = ParamStore.open(path)
    out = []
    for k in range(store.n_blocks + 1):
        theta, opt = store.read(k)
        out.append((theta.tobytes(), b"" if opt is None else opt.tobytes()))
    return out


def naive_rows(cfg) -> list[tuple[bytes, bytes]]:
    stored_training(naive_config(cfg), overwrite=True)
    return rows(cfg.paths.naive_store)


def ids(cfg, block: int, n: int = 1) -> list[str]:
    return [str(i) for i in load_block(cfg.paths.blocks, block).ids[:n]]


def test_a_retrain_from_an_exact_row_gives_the_naive_rows_byte_for_byte(cfg):
    """The premise: a deletion retrains rows d..d+t from the exact P_{d-1} on the current
    blocks; those rows are the naive retrain's, bit for bit, optimizer state included. The rows
    after (shifted) and the served row (stitched) are not, and the store says how far it is
    exact."""
    record = forget(cfg, ids(cfg, 5))
    stop = record["stop_block"]
    assert stop < 12 and record["tier"] == "approximate" and record["stitched_at"] == stop - 5
    store = ParamStore.open(cfg.paths.store)
    assert store.exact_through == stop and record["exact_through"] == stop
    assert [a["deletion"] for a in store.approximate] == [record["request_id"]]
    got, naive = rows(cfg.paths.store), naive_rows(cfg)
    assert got[: stop + 1] == naive[: stop + 1]  # rows 0..stop: exact
    assert all(g[0] != n[0] for g, n in zip(got[stop + 1 :], naive[stop + 1 :], strict=True))
    meta = store.meta
    assert meta["exactness"].startswith("rows 0..exact_through are bit-identical")
    from obliviate.errors import StoreError

    assert replay(cfg, rows=[stop]).passed  # an exact row replays; an approximate one is refused
    with pytest.raises(StoreError, match=f"row {stop + 1} is approximate .* consolidate"):
        replay(cfg, rows=[stop + 1])


def test_consolidation_makes_the_served_model_the_naive_one_bit_for_bit(cfg):
    """Two approximate deletions (the second before the first's stop: the frontier falls back),
    then a consolidation: every row, optimizer state included, equals the naive retrain's; the
    shifts are gone; the audit says which deletions became exact and holds the hash chain; the
    guard judges against the consolidated model from then on."""
    first = forget(cfg, ids(cfg, 7))
    second = forget(cfg, ids(cfg, 3))
    store = ParamStore.open(cfg.paths.store)
    assert store.exact_through == second["stop_block"] < 12
    assert consolidation.due(cfg) is None  # no trigger is on (tests consolidate themselves)
    out = consolidation.run(cfg)
    record = out["record"]
    assert record["kind"] == "consolidation" and record["first_block"] == second["stop_block"] + 1
    assert record["exact_deletions"] == [first["request_id"], second["request_id"]]
    store = ParamStore.open(cfg.paths.store)
    assert store.exact_through == 12 and store.approximate == [] and store.meta["shifts"] == []
    assert not list((store.path / "shifts").rglob("c/*"))  # the shifts' chunks are gone too
    got, naive = rows(cfg.paths.store), naive_rows(cfg)
    assert got == naive
    from obliviate.hashing import model_hash, row_hash

    served = ParamStore.open(cfg.paths.store).read_params(12)
    assert record["model_after"] == model_hash(served)
    stored = [row_hash(*ParamStore.open(cfg.paths.store).read(k)) for k in range(13)]
    assert record["chain"]["rows"] == stored
    from obliviate.guard import reference_of
    from obliviate.train import Trainer

    reference = reference_of(cfg, Trainer.from_config(cfg), served)
    assert store.meta["reference"]["val_predictions"] == reference["val_predictions"]
    assert lifecycle.refresh_owed(cfg) is None  # its metric refresh was paid
    evaluated = json.loads((cfg.paths.metrics / "evaluate.json").read_text())
    assert evaluated["accuracy"] == out["accuracy"]
    since = consolidation.exact_at(read_records(cfg.paths.audit))
    assert since[first["request_id"]].endswith(f"({record['request_id']})")
    assert consolidation.run(cfg)["sentence"] == "consolidate: every row is exact already"


def test_a_deletion_during_a_consolidation_is_caught_up_never_installed_stale(cfg, monkeypatch):
    """A deletion commits while a consolidation computes (outside the writer lock): at install
    the consolidation finds the block it changed, computes again from there, and installs rows
    that are the naive retrain's on the blocks as they are at the end."""
    forget(cfg, ids(cfg, 5))
    real = consolidation._compute
    meanwhile = []

    def compute_then_delete(*args, **kwargs):
        real(*args, **kwargs)
        if not meanwhile:  # between the first computation and its install
            meanwhile.append(forget(cfg, ids(cfg, 3)))

    monkeypatch.setattr(consolidation, "_compute", compute_then_delete)
    out = consolidation.consolidate(cfg)
    assert out.rounds == 2 and meanwhile  # computed twice: the deletion spoilt the first
    assert out.partial == []  # block 3 came before every row it had computed
    assert meanwhile[0]["request_id"] in out.record["exact_deletions"]
    assert rows(cfg.paths.store) == naive_rows(cfg)


def test_the_replay_check_passes_on_an_honest_store_and_names_a_tampered_row(cfg):
    forget(cfg, ids(cfg, 6))
    consolidation.run(cfg)
    honest = replay(cfg, sample=4, rows=[0, 12], seed=1)
    assert honest.passed and len(honest.checked) == 6 and honest.chain_rows == 6
    everything = replay(cfg, every=True)
    assert everything.passed and everything.checked == list(range(13))
    store = ParamStore.open(cfg.paths.store)
    theta = store.read_params(9)
    theta[3] = np.nextafter(theta[3], np.float32(1))  # one float one ulp off, checksum rewritten
    store.params[9] = theta  # through zarr: the chunk's checksum is right
    bad = replay(cfg, rows=[9])
    assert not bad.passed and bad.differing[0][0] == 9, bad.differing


def test_a_forgotten_sample_put_back_into_its_block_fails_the_replay_naming_the_row(cfg):
    from obliviate.hashing import file_digest
    from obliviate.partition import block_file, save_npz

    before = load_block(cfg.paths.blocks, 5)
    [sid] = ids(cfg, 5)
    forget(cfg, [sid])
    consolidation.run(cfg)
    path = cfg.paths.blocks / block_file(5)
    save_npz(path, ids=before.ids, y=before.y, x=before.x, slot=before.slot)  # put back, and
    manifest = json.loads((cfg.paths.blocks / "manifest.json").read_text())  # the manifest
    manifest["blocks"][4]["sha256"] = file_digest(path)  # made to agree, as a careful tamperer
    (cfg.paths.blocks / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(cfg.root / "params.yaml")
    store = ParamStore.open(cfg.paths.store)
    from obliviate.compat import store_fingerprint

    store.update_meta(fingerprint=store_fingerprint(cfg))  # ... and the store's fingerprint
    out = replay(cfg, rows=[5])
    assert not out.passed and out.differing[0][0] == 5
    assert "block 5 is not the block consolidation" in out.differing[0][1]
    replayed = replay(cfg, every=True)  # without the chain's word for it, the bytes differ too
    assert any(k == 5 and "differ from their replay" in why for k, why in replayed.differing)


def test_refusal_policy_consolidate_commits_the_stitch_and_makes_a_consolidation_due(cfg):
    from obliviate.guard import Guard, StitchVerdict

    policy = cfg.forget.model_copy(update={"on_refusal": "consolidate"})
    cfg = cfg.model_copy(update={"forget": policy})
    refused = StitchVerdict(False, 0.5, 0.9, -0.4, -0.3, 10)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Guard, "judge", lambda self, theta: refused)
        record = forget(cfg, ids(cfg, 5))
    assert record["guard_refused_committed"] and record["guard_rejections"] == 1
    assert record["stop_block"] < 12  # not extended: the request did not wait
    assert consolidation.due(cfg).startswith("a refused stitch was committed")
    consolidation.run(cfg)
    assert consolidation.due(cfg) is None


def test_the_triggers(cfg, monkeypatch):
    cfg = cfg.model_copy(update={"consolidate": cfg.consolidate.model_copy(
        update={"max_pending": 2, "max_drift": None})})  # fmt: skip
    forget(cfg, ids(cfg, 2))
    assert consolidation.due(cfg) is None
    forget(cfg, ids(cfg, 3))
    assert consolidation.due(cfg) == "2 approximate deletions pending (max_pending 2)"
    aged = cfg.model_copy(update={"consolidate": cfg.consolidate.model_copy(
        update={"max_pending": None, "max_age": "1h"})})  # fmt: skip
    store = ParamStore.open(cfg.paths.store)
    pending = store.approximate
    pending[0]["committed"] -= 1900  # half the deadline gone: time to start
    store.update_meta(approximate=pending)
    assert consolidation.due(aged).startswith("an approximate deletion is 0.5 h old")
    assert "exact through row" in consolidation.Exactness.of(aged).describe(aged)


def test_recovery_applies_a_staged_consolidation_after_a_kill(cfg, monkeypatch):
    """Killed after its commit point (staged, not applied): the next writer applies it."""
    from obliviate import transaction

    forget(cfg, ids(cfg, 6))

    def killed(cfg, txn_id):
        raise SystemExit("killed after the commit point")

    with monkeypatch.context() as m:
        m.setattr(transaction, "apply", killed)
        with pytest.raises(SystemExit):
            consolidation.consolidate(cfg)
    assert ParamStore.open(cfg.paths.store).exact_through < 12
    out = drain(cfg, refresh=False)  # the next writer: recovery applies it first
    assert out.recovered[0].startswith("con-")
    assert ParamStore.open(cfg.paths.store).exact_through == 12
    assert rows(cfg.paths.store) == naive_rows(cfg)


def test_a_deletion_that_moves_the_exact_row_past_the_works_start_leaves_no_stale_row(
    cfg, monkeypatch
):
    """While a consolidation computes from row K, a deletion at block K retrains past K: the
    store is exact further than the work's start now, and the work's rows from K on were
    trained on the old block. The consolidation starts again from the live exact row and
    installs none of its old rows: the result is the naive retrain's."""
    forget(cfg, ids(cfg, 3))
    k = ParamStore.open(cfg.paths.store).exact_through
    assert k < 10
    real = consolidation._compute
    meanwhile = []

    def compute_then_delete(*args, **kwargs):
        real(*args, **kwargs)
        if not meanwhile:
            meanwhile.append(forget(cfg, ids(cfg, k)))
            assert meanwhile[0]["exact_through"] > k  # the live store is exact past the work

    monkeypatch.setattr(consolidation, "_compute", compute_then_delete)
    out = consolidation.consolidate(cfg)
    assert out.rounds == 2 and out.record["first_block"] == meanwhile[0]["exact_through"] + 1
    assert rows(cfg.paths.store) == naive_rows(cfg)


@pytest.mark.slow
def test_the_two_tiers_through_the_cli(template, tmp_path):
    """forget (approximate) -> status and info name the frontier -> consolidate -> audit says
    since when each deletion is exact -> replay passes -> the naive retrain is byte-identical
    -> DVC and git are clean. The commands a user runs, in a DVC + git workspace."""
    from e2e import BIN, dvc_status, sh

    ws = tmp_path / "ws"
    shutil.copytree(template, ws, symlinks=True)
    cli = [str(BIN / "obliviate")]
    sid = str(load_block(ws / "data" / "blocks", 5).ids[0])
    forgot = sh(ws, *cli, "forget", sid).stdout
    assert "forgot 1 sample(s)" in forgot
    assert "approximate deletion(s) pending" in sh(ws, *cli, "status").stdout
    assert "exact through row" in sh(ws, *cli, "info").stdout
    done = sh(ws, *cli, "consolidate").stdout
    assert done.startswith("consolidated: retrained blocks") and "1 deletion(s) now exact" in done
    audit = sh(ws, *cli, "audit", COLUMNS="200").stdout  # (a table wider than 80 columns)
    assert "consolidation" in audit and "pending" not in audit
    assert sh(ws, *cli, "replay", "--sample", "3").stdout.startswith("replay: PASS: 3 row(s)")
    naive = sh(ws, *cli, "retrain", "--naive").stdout
    assert "served P_B and naive P_B: byte-identical" in naive
    assert "up to date" in dvc_status(ws)
    assert sh(ws, "git", "status", "--porcelain", "--untracked-files=no").stdout == ""


def test_a_deletion_at_a_later_block_lets_the_consolidation_install_the_prefix_first(
    cfg, monkeypatch
):
    """A deletion meanwhile at a block past the consolidation's first row spoils only the rows
    from that block on: the rows before it are installed at once (the store is exact further,
    the served model unchanged), the rest computed again; the end is the naive retrain's."""
    forget(cfg, ids(cfg, 2))
    k = ParamStore.open(cfg.paths.store).exact_through
    real = consolidation._compute
    meanwhile = []

    def compute_then_delete(*args, **kwargs):
        real(*args, **kwargs)
        if not meanwhile:
            meanwhile.append(forget(cfg, ids(cfg, 11)))

    monkeypatch.setattr(consolidation, "_compute", compute_then_delete)
    out = consolidation.consolidate(cfg)
    (prefix,) = out.partial
    record = next(r for r in read_records(cfg.paths.audit) if r["request_id"] == prefix)
    assert record["partial"] and record["first_block"] == k + 1 and record["stop_block"] == 10
    assert record["model_before"] == record["model_after"] and record["exact_deletions"] == []
    assert out.record["first_block"] == 11 and not out.record.get("partial")
    assert rows(cfg.paths.store) == naive_rows(cfg)


def test_a_consolidation_killed_after_its_rows_before_their_hashes_resumes(cfg, monkeypatch):
    """Killed once every row is computed and saved but before the live rows' hashes and the
    reference: the next run finishes those (no row trained again) and installs."""
    forget(cfg, ids(cfg, 6))

    def killed(*args, **kwargs):
        raise SystemExit("killed")

    with monkeypatch.context() as m:
        m.setattr(consolidation, "reference_of", killed)
        with pytest.raises(SystemExit):
            consolidation.consolidate(cfg)
    trained = []
    real = Trainer.run_block
    monkeypatch.setattr(Trainer, "run_block", lambda self, *a: trained.append(1) or real(self, *a))
    out = consolidation.consolidate(cfg)
    assert out.record is not None and trained == []
    assert rows(cfg.paths.store) == naive_rows(cfg)
