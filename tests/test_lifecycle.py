"""The request lifecycle: one journal, its states, batching, refusals, recovery from it."""

import json

import pytest

from obliviate import deletion, lifecycle
from obliviate.audit import IdHasher, append_record, redact
from obliviate.errors import RequestError
from obliviate.partition import load_block


def ids_of(cfg, k: int, n: int) -> list[str]:
    return [str(i) for i in load_block(cfg.paths.blocks, k).ids[:n]]


def journal_bytes(cfg) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(lifecycle.journal_dir(cfg).iterdir()))


def test_a_request_is_queued_at_once_with_its_plan_and_reported(prepared):
    wanted = [*ids_of(prepared, 2, 2), *ids_of(prepared, 5, 1)]
    rid = lifecycle.submit(prepared, wanted)
    entry = lifecycle.get(prepared, rid)
    assert entry["status"] == "queued" and entry["ids"] == wanted
    assert entry["plan"] == {"2": wanted[:2], "5": wanted[2:]}
    assert lifecycle.counts(prepared)["queued"] == 1
    assert "queued (3 sample(s)" in lifecycle.describe(entry)


@pytest.mark.parametrize("bad", [["digits:999999"], []])
def test_bad_requests_are_refused_at_once_and_leave_nothing(prepared, bad):
    with pytest.raises(RequestError):
        lifecycle.submit(prepared, bad)
    assert lifecycle.entries(prepared) == []
    assert not lifecycle.journal_dir(prepared).exists()


def test_unknown_request_id_is_a_clear_error(prepared):
    with pytest.raises(RequestError, match="no deletion request 'req-nope'"):
        lifecycle.get(prepared, "req-nope")
    with pytest.raises(RequestError):
        lifecycle.get(prepared, "../../params")
    with pytest.raises(RequestError):  # the journal's other file is not a request
        lifecycle.get(prepared, "refresh")


def test_claim_batches_queued_requests_into_one_plan(prepared):
    a, b = ids_of(prepared, 1, 2), ids_of(prepared, 4, 1)
    first = lifecycle.submit(prepared, a)
    second = lifecycle.submit(prepared, [a[0], *b])  # overlaps the first: one sweep forgets both
    gone = ids_of(prepared, 5, 1)
    third = lifecycle.submit(prepared, gone)
    append_record(prepared.paths.audit, {"request_id": "del-x",
                                         **IdHasher.of(prepared).hashes(gone)})  # fmt: skip
    batch = lifecycle.claim(prepared)
    assert [e["request_id"] for e in batch.accepted] == [first, second, third]
    assert sorted(batch.ids) == sorted([*a, *b])  # the third's id is gone already
    assert batch.plan == {1: a, 4: b}


def test_first_come_first_served_when_requests_conflict(prepared):
    block = ids_of(prepared, 3, 10_000)
    half = len(block) // 2
    first = lifecycle.submit(prepared, block[:half])
    second = lifecycle.submit(prepared, block[half:])  # together they would empty block 3
    batch = lifecycle.claim(prepared)
    assert [e["request_id"] for e in batch.accepted] == [first]
    refused = lifecycle.get(prepared, second)
    assert refused["status"] == "refused" and "would empty block(s) [3]" in refused["reason"]


def test_a_plan_is_made_once_unless_the_blocks_or_the_audit_changed(prepared, monkeypatch):
    """Claim reuses the plan made when the request was validated; after the audit (or the
    blocks) changed, it plans again."""
    from obliviate import requests

    a, b = ids_of(prepared, 2, 1), ids_of(prepared, 6, 1)
    lifecycle.submit(prepared, a)
    lifecycle.submit(prepared, b)
    calls = []
    real = requests.plan_deletion
    monkeypatch.setattr(
        lifecycle, "plan_deletion", lambda *x, **k: calls.append(1) or real(*x, **k)
    )
    assert lifecycle.claim(prepared).plan == {2: a, 6: b} and calls == []
    append_record(prepared.paths.audit, {"request_id": "del-y", "sample_id_hashes": []})
    assert lifecycle.claim(prepared).plan == {2: a, 6: b} and len(calls) == 2


def test_finished_requests_keep_hashes_not_ids(prepared):
    wanted = ids_of(prepared, 2, 1)
    rid = lifecycle.submit(prepared, wanted)
    batch = lifecycle.claim(prepared)
    lifecycle.start(prepared, batch, "del-1")
    assert lifecycle.get(prepared, rid)["status"] == "running"
    lifecycle.commit(prepared, "del-1")
    assert lifecycle.get(prepared, rid)["status"] == "committed"
    assert lifecycle.refresh_owed(prepared)["after"] == "del-1"
    (done,) = lifecycle.finish_deletion(prepared, "del-1", "done")
    entry = lifecycle.get(prepared, rid)
    assert entry == done and entry["status"] == "done" and entry["deletion"] == "del-1"
    assert entry["id_hashes"] == [IdHasher.of(prepared)(wanted[0])]
    assert entry["id_hash"] == "hmac-sha256" and "plan" not in entry
    assert wanted[0].encode() not in journal_bytes(prepared)


def test_recovery_finishes_a_killed_deletion_from_the_ids_the_audit_does_not_list(trained):
    """Two requests a killed drain left running for one deletion, whose first sweep landed (the
    audit lists one request's ids): recovery retrains for the other's ids only, and finishes
    both requests done, once."""
    landed, lost = ids_of(trained, 2, 1), ids_of(trained, 4, 1)
    a, b = lifecycle.submit(trained, landed), lifecycle.submit(trained, lost)
    lifecycle.start(trained, lifecycle.claim(trained), "del-killed")
    append_record(trained.paths.audit, {"request_id": "del-killed-b2",
                                        **IdHasher.of(trained).hashes(landed)})  # fmt: skip
    out = deletion.drain(trained, refresh=False)
    assert out.recovered == ["del-killed"] and out.record is None
    assert [e["request_id"] for e in out.done] == [a, b]
    assert all(lifecycle.get(trained, r)["status"] == "done" for r in (a, b))
    from obliviate.audit import read_records

    (_, again) = read_records(trained.paths.audit)
    assert again["request_id"] == "del-killed" and again["blocks"] == [4]
    assert again["sample_id_hashes"] == [IdHasher.of(trained)(lost[0])]


def test_a_retried_forget_joins_its_unfinished_request(prepared):
    wanted = ids_of(prepared, 2, 2)
    rid = lifecycle.submit(prepared, wanted)
    lifecycle.start(prepared, lifecycle.claim(prepared), "del-landed")
    append_record(prepared.paths.audit, {"request_id": "del-landed",
                                         **IdHasher.of(prepared).hashes(wanted)})  # fmt: skip
    # its deletion is in the audit, yet the retry is not refused as "already forgotten"
    assert lifecycle.submit(prepared, wanted[::-1]) == rid
    lifecycle.commit(prepared, "del-landed")
    assert lifecycle.submit(prepared, wanted) == rid
    lifecycle.finish_deletion(prepared, "del-landed", "done")
    # done, but the command that ran it was killed before the metric refresh: still joined
    assert lifecycle.submit(prepared, wanted) == rid
    assert [e["request_id"] for e in lifecycle.entries(prepared)] == [rid]
    lifecycle.refresh_paid(prepared, lifecycle.refresh_owed(prepared), None)
    with pytest.raises(RequestError, match="already forgotten"):  # a finished one is not joined
        lifecycle.submit(prepared, wanted)
    with pytest.raises(RequestError, match="already forgotten"):  # nor by other ids
        lifecycle.submit(prepared, wanted[:1])


def test_a_named_drain_claims_the_queued_requests_it_covers(prepared):
    wanted, other = ids_of(prepared, 2, 2), ids_of(prepared, 4, 1)
    left = lifecycle.submit(prepared, wanted[:1])  # a forget killed before its drain claimed it
    unrelated = lifecycle.submit(prepared, other)
    retry = lifecycle.submit(prepared, wanted)
    batch = lifecycle.claim(prepared, only=retry)
    assert [e["request_id"] for e in batch.accepted] == [left, retry]
    assert sorted(batch.ids) == sorted(wanted)
    assert lifecycle.get(prepared, unrelated)["status"] == "queued"


def test_force_on_one_request_does_not_carry_over_to_the_next(prepared):
    block = ids_of(prepared, 3, 10_000)
    forced = lifecycle.submit(prepared, ids_of(prepared, 5, 1), force=True)
    unsafe = {**lifecycle.get(prepared, forced), "request_id": "req-unsafe", "ids": block,
              "force": False, "n_samples": len(block), "order": 2**62}  # fmt: skip
    del unsafe["plan"], unsafe["planned_in"]
    lifecycle._write(prepared, unsafe)  # queued directly: submit would refuse it
    batch = lifecycle.claim(prepared)
    assert [e["request_id"] for e in batch.accepted] == [forced]
    refused = lifecycle.get(prepared, "req-unsafe")
    assert refused["status"] == "refused" and "pass --force" in refused["reason"]


def test_refusal_reasons_name_hashes_not_ids(prepared):
    wanted = ids_of(prepared, 5, 1)
    rid = lifecycle.submit(prepared, wanted)
    block = ids_of(prepared, 3, 10_000)
    first = lifecycle.submit(prepared, block[: len(block) // 2])
    second = lifecycle.submit(prepared, block[len(block) // 2 :])  # conflicts with the first
    lifecycle.claim(prepared)
    refused = lifecycle.get(prepared, second)
    assert refused["status"] == "refused"
    assert "conflicts with requests queued before" in refused["reason"]
    on_disk = journal_bytes(prepared)
    assert not any(f'"{i}"'.encode() in on_disk for i in block[len(block) // 2 :])
    assert lifecycle.get(prepared, first)["status"] == "queued" and rid


def test_redact_replaces_every_id_by_its_keyed_hash():
    hasher = IdHasher(b"k" * 32)
    text = redact("unknown sample id(s) a:12, a:123", ["a:12", "a:123"], hasher)
    assert "a:12" not in text and text.count("<id:") == 2
    assert hasher("a:123")[:12] in text


def test_ids_forgotten_meanwhile_make_a_request_done_not_refused(trained):
    wanted = ids_of(trained, 2, 1)
    rid = lifecycle.submit(trained, wanted)
    append_record(trained.paths.audit, {"request_id": "del-direct",
                                        **IdHasher.of(trained).hashes(wanted)})  # fmt: skip
    out = deletion.drain(trained, refresh=False)
    assert out.record is None and [e["request_id"] for e in out.done] == [rid]
    done = lifecycle.get(trained, rid)
    assert done["status"] == "done" and "ids" not in done
    assert done["deletion"] == "an earlier deletion"


def test_a_deletion_that_became_impossible_refuses_its_requests_with_hashes(prepared):
    """A running request whose ids no longer plan (here: gone from the blocks) is refused by
    recovery, once, with a reason that names the id by its keyed hash."""
    [sid] = ids_of(prepared, 2, 1)
    rid = lifecycle.submit(prepared, [sid])
    lifecycle.start(prepared, lifecycle.claim(prepared), "del-refused")
    entry = lifecycle.get(prepared, rid)
    lifecycle._write(prepared, {**entry, "ids": ["digits:99999"]})
    with lifecycle_lock(prepared):
        assert deletion.recover(prepared) == ([], [])
    refused = lifecycle.get(prepared, rid)
    hashed = f"<id:{IdHasher.of(prepared)('digits:99999')[:12]}>"
    assert refused["status"] == "refused" and hashed in refused["reason"]
    assert "unknown sample id" in refused["reason"] and b"99999" not in journal_bytes(prepared)


def lifecycle_lock(cfg):
    from obliviate.transaction import State

    return State.of(cfg).lock()


def test_a_request_is_done_at_its_commit_and_the_refresh_is_owed_apart(trained, monkeypatch):
    """Killed in the metric refresh, a forget has already finished its request; the refresh is
    owed in the journal, `status` says the metrics are stale, and the same forget again pays it
    and reports the deletion (not "already forgotten")."""
    [sid] = ids_of(trained, 4, 1)

    def killed(cfg, after, trainer=None):
        raise SystemExit("killed")  # the deletion is applied, the metrics are not refreshed

    with monkeypatch.context() as m:
        m.setattr(deletion, "refresh_metrics", killed)
        with pytest.raises(SystemExit):
            deletion.forget(trained, [sid])
    (request,) = lifecycle.entries(trained)
    assert request["status"] == "done" and "ids" not in request  # done before the metrics
    owed = lifecycle.refresh_owed(trained)
    assert owed["after"] == request["deletion"]
    assert lifecycle.describe_metrics(trained).startswith(
        f"metrics: stale since deletion {owed['after']}"
    )
    assert not (trained.paths.metrics / "evaluate.json").exists()
    record = deletion.forget(trained, [sid])  # the same forget again: not "already forgotten"
    (again,) = lifecycle.entries(trained)
    assert again == request and record["deletion"] == request["deletion"]
    evaluated = json.loads((trained.paths.metrics / "evaluate.json").read_text())  # the refresh
    assert record["test_accuracy_after"] == evaluated["accuracy"]  # it missed
    assert lifecycle.refresh_owed(trained) is None
    assert lifecycle.describe_metrics(trained).startswith("metrics: current")


def test_a_damaged_request_file_does_not_stop_queuing_another(prepared):
    folder = lifecycle.journal_dir(prepared)
    folder.mkdir(parents=True)
    torn = folder / "req-20990101T000000-abcdef.json"
    torn.write_text("{torn")
    wanted = ids_of(prepared, 2, 1)
    rid = lifecycle.submit(prepared, wanted)
    queued = lifecycle.get(prepared, rid)
    assert queued["status"] == "queued" and queued["ids"] == wanted
    with pytest.raises(RequestError, match=f"{torn.name} is damaged"):  # the drain names it
        lifecycle.claim(prepared)
    assert torn.read_text() == "{torn"  # left for the user to restore or remove


def test_redact_also_replaces_ids_as_messages_show_them():
    from obliviate.errors import shown_id

    hasher = IdHasher(b"k" * 32)
    odd, long = "café-1\n", "x/" * 100 + "img.png"  # escaped, and cut to 60 characters
    text = f"unknown sample id(s) {shown_id(odd)}, {shown_id(long)}"
    redacted = redact(text, [odd, long], hasher)
    assert "caf" not in redacted and "x/x/" not in redacted and redacted.count("<id:") == 2


def test_one_forget_plans_once_checks_the_store_once_and_builds_one_trainer(trained, monkeypatch):
    """The fixed costs of a served deletion, counted: one plan (made when the request is
    validated, reused by the drain), one integrity check and one fit check of the store, one
    trainer (the checks build it; the sweep and the metric refresh use it). The drain reports
    where its time went and when the deletion was committed."""
    import time

    from obliviate import compat, fsck, requests
    from obliviate.train import Trainer

    counted = {"plan": 0, "preflight": 0, "fit": 0, "trainer": 0}

    def count(name, fn):
        def counting(*args, **kwargs):
            counted[name] += 1
            return fn(*args, **kwargs)

        return counting

    monkeypatch.setattr(lifecycle, "plan_deletion", count("plan", requests.plan_deletion))
    monkeypatch.setattr(deletion, "plan_deletion", count("plan", requests.plan_deletion))
    monkeypatch.setattr(deletion, "preflight", count("preflight", fsck.preflight))
    monkeypatch.setattr(deletion, "require_usable", count("fit", compat.require_usable))
    real = Trainer.from_config.__func__
    building = count("trainer", lambda cls, *a, **k: real(cls, *a, **k))
    monkeypatch.setattr(Trainer, "from_config", classmethod(building))
    before, out = time.time(), {}

    def drain(request, wait):
        out["d"] = deletion.drain(trained, request)
        return out["d"]

    record = deletion.forget(trained, ids_of(trained, 4, 1), drain_with=drain)
    assert counted == {"plan": 1, "preflight": 1, "fit": 1, "trainer": 1}
    drained = out["d"]
    (request,) = lifecycle.entries(trained)
    assert request["status"] == "done" and record["deletion"] == request["deletion"]
    assert set(drained.seconds) == {"checks", "deletion", "refresh"}
    assert all(s > 0 for s in drained.seconds.values())
    assert before < drained.committed_unix <= request["finished_unix"]
    (sweep,) = record["sweeps"]
    assert 0 < sweep["timings_s"]["retrain"] < sweep["timings_s"]["compute"]
    assert sweep["timings_s"]["compute"] < drained.seconds["deletion"]
