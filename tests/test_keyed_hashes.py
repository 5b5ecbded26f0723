"""Keyed id hashes: HMAC-SHA256 under a key outside git; old unkeyed audits still honoured."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import stat

import pytest

from obliviate import lifecycle
from obliviate.audit import (
    KEY_ENV,
    KEY_FILE,
    Forgotten,
    IdHasher,
    append_record,
    legacy_id_hash,
    read_records,
)
from obliviate.errors import RequestError, StoreError
from obliviate.partition import load_block

DIGITS_IDS = [f"digits:{i}" for i in range(1797)]  # every sample id of the dataset
HEX64 = re.compile(rb"[0-9a-f]{64}")


def hashes_in(folder, skip=()) -> set[str]:
    """Every 64-hex-digit string in every file under ``folder``."""
    found = set()
    for p in folder.rglob("*"):
        if p.is_file() and p not in skip:
            found |= {m.decode() for m in HEX64.findall(p.read_bytes())}
    return found


def test_no_hash_in_the_workspace_reidentifies_a_sample_without_the_key(trained, monkeypatch):
    """After a deletion (and its request, finished in the journal), enumerate digits:0..1796
    against every stored hash: no unkeyed sha256 matches; the keyed hashes match only under the
    workspace's key."""
    from obliviate.deletion import forget

    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = trained
    sid = str(load_block(cfg.paths.blocks, 5).ids[3])
    forget(cfg, [sid])
    (request,) = lifecycle.entries(cfg)
    rid = request["request_id"]
    key_file = cfg.paths.state / KEY_FILE
    stored = hashes_in(cfg.root, skip={key_file})
    assert stored  # the audit and the request journal hold hashes

    unkeyed = {legacy_id_hash(i) for i in DIGITS_IDS}
    unkeyed |= {hashlib.sha256(i.encode()).hexdigest() for i in DIGITS_IDS}
    assert not stored & unkeyed

    hasher = IdHasher.of(cfg)
    keyed = {hasher(i): i for i in DIGITS_IDS}
    assert {keyed[h] for h in stored if h in keyed} == {sid}
    for where in (cfg.paths.audit, lifecycle.journal_dir(cfg) / f"{rid}.json"):
        assert hasher(sid) in where.read_text() and sid not in where.read_text()
    wrong = IdHasher(secrets.token_bytes(32))
    assert not stored & {wrong(i) for i in DIGITS_IDS}


def test_the_key_is_created_once_with_mode_0600_and_never_by_a_reader(prepared, monkeypatch):
    from obliviate.fsck import check

    monkeypatch.delenv(KEY_ENV, raising=False)
    key_file = prepared.paths.state / KEY_FILE
    Forgotten.of(prepared)  # reading needs no key
    check(prepared)
    assert not key_file.exists()
    hasher = IdHasher.of(prepared)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key_file.read_text())) == 32
    assert IdHasher.of(prepared) == hasher  # created once
    monkeypatch.setenv(KEY_ENV, secrets.token_hex(32))  # the environment wins over the file
    assert IdHasher.of(prepared).key != hasher.key


def test_an_environment_key_writes_no_key_file(prepared, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "ab" * 32)
    assert IdHasher.of(prepared).key == bytes.fromhex("ab" * 32)
    assert not (prepared.paths.state / KEY_FILE).exists()
    monkeypatch.setenv(KEY_ENV, "not hex")
    with pytest.raises(StoreError, match=f"{KEY_ENV} is not an id key"):
        IdHasher.of(prepared)


def test_a_lost_or_replaced_key_refuses_instead_of_forgetting_what_was_forgotten(
    prepared, monkeypatch
):
    """Without the key, forgotten samples cannot be recognised: a deletion check or a new
    partition would let them back in, so every reader refuses until the key is restored."""
    from obliviate.fsck import check
    from obliviate.requests import plan_deletion

    monkeypatch.delenv(KEY_ENV, raising=False)
    sid = str(load_block(prepared.paths.blocks, 1).ids[0])
    hasher = IdHasher.of(prepared)
    append_record(prepared.paths.audit, {"request_id": "r1", **hasher.hashes([sid])})
    key_file = prepared.paths.state / KEY_FILE
    saved = key_file.read_text()

    key_file.unlink()  # lost
    for attempt in (lambda: Forgotten.of(prepared), lambda: IdHasher.of(prepared)):
        with pytest.raises(StoreError, match=f"made with id key {hasher.key_id}.*restore"):
            attempt()
    assert not key_file.exists()  # no new key replaces the lost one
    assert any("restore that key" in p for p in check(prepared))

    monkeypatch.setenv(KEY_ENV, secrets.token_hex(32))  # another key
    with pytest.raises(StoreError, match=f"made with id key {hasher.key_id}, not with"):
        Forgotten.of(prepared)

    monkeypatch.delenv(KEY_ENV)
    key_file.write_text(saved)  # restored: the sample is recognised again
    with pytest.raises(RequestError, match="already forgotten"):
        plan_deletion([sid], prepared.paths.blocks, Forgotten.of(prepared))


def test_a_deletion_on_an_old_unkeyed_audit_still_refuses_a_forgotten_id(trained, monkeypatch):
    """Migration: records without "id_hash" are read with the old unkeyed hash, so an id they
    list stays forgotten for deletions, queued requests and a new partition; new records are
    keyed."""
    from obliviate.data import load_dataset
    from obliviate.deletion import forget
    from obliviate.partition import without_forgotten

    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = trained
    old = str(load_block(cfg.paths.blocks, 2).ids[0])
    append_record(cfg.paths.audit, {"request_id": "del-old", "sample_id_hashes":
                                    [legacy_id_hash(old)]})  # fmt: skip
    with pytest.raises(RequestError, match=f"{old} already forgotten"):
        forget(cfg, [old])
    assert lifecycle.entries(cfg) == []  # refused before the journal
    with pytest.raises(RequestError, match="already forgotten"):
        lifecycle.submit(cfg, [old])

    new = str(load_block(cfg.paths.blocks, 9).ids[0])
    forget(cfg, [new])
    records = read_records(cfg.paths.audit)
    assert "id_hash" not in records[0] and records[1]["id_hash"] == "hmac-sha256"
    assert records[1]["sample_id_hashes"] == [IdHasher.of(cfg)(new)]
    for sid in (old, new):
        with pytest.raises(RequestError, match="already forgotten"):
            forget(cfg, [sid])
    ds = without_forgotten(load_dataset(cfg.prepare, cfg.root), Forgotten.of(cfg))
    assert not {old, new} & set(ds.train.ids)


def test_the_manifest_keeps_keyed_owner_hashes(prepared, monkeypatch):
    import numpy as np

    from obliviate.data import load_dataset
    from obliviate.partition import split_training
    from obliviate.trigger import plant_owner
    from obliviate.verify import owners_present
    from tasks.data import write_blocks

    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = prepared
    ds = load_dataset(cfg.prepare, cfg.root)
    p = cfg.prepare
    val, blocks = split_training(ds.train.y, p.val_fraction, p.blocks, p.seed)
    planted, owners = plant_owner(ds, blocks, cfg.verify, cfg.prepare.seed)
    assert owners
    manifest = write_blocks.fn(cfg, planted, val, blocks, owners)
    v = manifest["verification"]
    assert v["id_hash"] == "hmac-sha256" and v["id_key"] == IdHasher.of(cfg).key_id
    stored = set(v["owner_id_hashes"])
    assert not stored & {legacy_id_hash(i) for i in DIGITS_IDS}
    assert sorted(owners_present(cfg, manifest)) == sorted(owners)
    assert owners_present(cfg, manifest, exclude=owners) == []
    on_disk = json.loads((cfg.paths.blocks / "manifest.json").read_text())
    assert on_disk["verification"]["owner_id_hashes"] == v["owner_id_hashes"]
    assert np.all([o not in json.dumps(on_disk) for o in owners])


def test_migrate_rewrites_unkeyed_records_it_can_match_and_keeps_them_forgotten(
    prepared, monkeypatch
):
    from obliviate.audit import migrate
    from obliviate.requests import plan_deletion

    monkeypatch.delenv(KEY_ENV, raising=False)
    a, b = (str(i) for i in load_block(prepared.paths.blocks, 1).ids[:2])
    old = sorted([legacy_id_hash(a), legacy_id_hash(b)])
    append_record(prepared.paths.audit, {"request_id": "r0", "sample_id_hashes": old})
    stranger = legacy_id_hash("digits:not-in-the-source")
    append_record(prepared.paths.audit, {"request_id": "r1", "sample_id_hashes": [stranger]})
    assert migrate(prepared, DIGITS_IDS, lifecycle.journal_dir(prepared)) == (1, 1)
    r0, r1 = read_records(prepared.paths.audit)
    hasher = IdHasher.of(prepared)
    assert r0["sample_id_hashes"] == sorted([hasher(a), hasher(b)])
    assert r0["id_hash"] == "hmac-sha256" and "id_hash" not in r1
    assert legacy_id_hash(a) not in prepared.paths.audit.read_text()
    for sid in (a, b):
        with pytest.raises(RequestError, match="already forgotten"):
            plan_deletion([sid], prepared.paths.blocks, Forgotten.of(prepared))
    assert migrate(prepared, DIGITS_IDS, lifecycle.journal_dir(prepared)) == (0, 1)
