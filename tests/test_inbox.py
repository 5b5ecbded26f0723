"""The deletion inbox: durable requests, batching, refusals, crash reconciliation."""

import json

import pytest

from obliviate import inbox
from obliviate.audit import IdHasher, append_record
from obliviate.errors import RequestError
from obliviate.partition import load_block


def ids_of(cfg, k: int, n: int) -> list[str]:
    return [str(i) for i in load_block(cfg.paths.blocks, k).ids[:n]]


def test_a_request_is_queued_at_once_and_reported(prepared):
    wanted = ids_of(prepared, 2, 2)
    rid = inbox.submit(prepared, wanted)
    entry = inbox.get(prepared, rid)
    assert entry["status"] == "queued" and entry["ids"] == wanted
    assert inbox.counts(prepared)["queued"] == 1
    assert "queued (2 sample(s)" in inbox.describe(entry)


@pytest.mark.parametrize("bad", [["digits:999999"], []])
def test_bad_requests_are_refused_at_once_and_leave_nothing(prepared, bad):
    with pytest.raises(RequestError):
        inbox.submit(prepared, bad)
    assert inbox.entries(prepared) == []
    assert not inbox.inbox_dir(prepared).exists() or not any(inbox.inbox_dir(prepared).iterdir())


def test_unknown_request_id_is_a_clear_error(prepared):
    with pytest.raises(RequestError, match="no deletion request 'req-nope'"):
        inbox.get(prepared, "req-nope")
    with pytest.raises(RequestError):
        inbox.get(prepared, "../../params")


def test_claim_batches_queued_requests_in_one_sweep(prepared):
    a, b = ids_of(prepared, 1, 2), ids_of(prepared, 4, 1)
    first = inbox.submit(prepared, a)
    second = inbox.submit(prepared, [a[0], *b])  # overlaps the first: one sweep forgets both
    gone = ids_of(prepared, 5, 1)
    third = inbox.submit(prepared, gone)
    append_record(prepared.paths.audit, {"request_id": "del-x",
                                         **IdHasher.of(prepared).hashes(gone)})  # fmt: skip
    batch = inbox.claim(prepared)
    assert [e["request_id"] for e in batch.accepted] == [first, second, third]
    assert sorted(batch.ids) == sorted([*a, *b])  # the third's id is gone already


def test_first_come_first_served_when_requests_conflict(prepared):
    block = ids_of(prepared, 3, 10_000)
    half = len(block) // 2
    first = inbox.submit(prepared, block[:half])
    second = inbox.submit(prepared, block[half:])  # together they would empty block 3
    batch = inbox.claim(prepared)
    assert [e["request_id"] for e in batch.accepted] == [first]
    assert inbox.get(prepared, second)["status"] == "refused"


def test_finished_requests_keep_hashes_not_ids(prepared):
    wanted = ids_of(prepared, 2, 1)
    rid = inbox.submit(prepared, wanted)
    batch = inbox.claim(prepared)
    inbox.mark_running(prepared, batch, "del-1")
    inbox.mark_done(prepared, batch)
    entry = inbox.get(prepared, rid)
    assert entry["status"] == "done" and entry["id_hashes"] == [IdHasher.of(prepared)(wanted[0])]
    assert entry["id_hash"] == "hmac-sha256"
    on_disk = b"".join(p.read_bytes() for p in inbox.inbox_dir(prepared).iterdir())
    assert wanted[0].encode() not in on_disk


def test_reconcile_after_a_killed_drain(prepared):
    landed = inbox.submit(prepared, ids_of(prepared, 2, 1))
    batch = inbox.claim(prepared)
    inbox.mark_running(prepared, batch, "del-landed")
    lost = inbox.submit(prepared, ids_of(prepared, 4, 1))
    batch = inbox.claim(prepared)
    inbox.mark_running(prepared, batch, "del-lost")
    append_record(prepared.paths.audit, {"request_id": "del-landed", "sample_id_hashes": []})
    inbox.reconcile(prepared)
    assert inbox.get(prepared, landed)["status"] == "done"
    requeued = inbox.get(prepared, lost)
    assert requeued["status"] == "queued" and requeued["ids"] and requeued["deletion"] is None


def test_a_retried_forget_joins_the_request_a_killed_drain_left_running(prepared):
    wanted = ids_of(prepared, 2, 2)
    rid = inbox.submit(prepared, wanted)
    inbox.mark_running(prepared, inbox.claim(prepared), "del-landed")
    append_record(prepared.paths.audit, {"request_id": "del-landed",
                                         **IdHasher.of(prepared).hashes(wanted)})  # fmt: skip
    # its deletion is in the audit, yet the retry is not refused as "already forgotten"
    assert inbox.submit(prepared, wanted[::-1]) == rid
    assert [e["request_id"] for e in inbox.entries(prepared)] == [rid]
    (landed,) = inbox.reconcile(prepared, finish_done=False)  # drain finishes it later
    assert landed["status"] == "running" and inbox.get(prepared, rid)["status"] == "running"
    inbox.finish(prepared, landed, "done")
    with pytest.raises(RequestError, match="already forgotten"):  # a finished one is not joined
        inbox.submit(prepared, wanted)


def test_a_named_drain_claims_the_queued_requests_it_covers(prepared):
    wanted, other = ids_of(prepared, 2, 2), ids_of(prepared, 4, 1)
    left = inbox.submit(prepared, wanted[:1])  # a forget killed before its drain claimed it
    unrelated = inbox.submit(prepared, other)
    retry = inbox.submit(prepared, wanted)
    batch = inbox.claim(prepared, only=retry)
    assert [e["request_id"] for e in batch.accepted] == [left, retry]
    assert sorted(batch.ids) == sorted(wanted)
    assert inbox.get(prepared, unrelated)["status"] == "queued"


def test_force_on_one_request_does_not_carry_over_to_the_next(prepared):
    block = ids_of(prepared, 3, 10_000)
    forced = inbox.submit(prepared, ids_of(prepared, 5, 1), force=True)
    inbox._write(inbox.inbox_dir(prepared), {  # queued directly: submit would refuse it
        **inbox.get(prepared, forced), "request_id": "req-unsafe", "ids": block, "force": False,
        "n_samples": len(block), "order": 2**62})  # fmt: skip
    batch = inbox.claim(prepared)
    assert [e["request_id"] for e in batch.accepted] == [forced]
    assert inbox.get(prepared, "req-unsafe")["status"] == "refused"


def test_refusal_reasons_name_hashes_not_ids(prepared):
    wanted = ids_of(prepared, 5, 1)
    rid = inbox.submit(prepared, wanted)
    append_record(prepared.paths.audit, {"request_id": "del-x", "sample_id_hashes": []})
    block = ids_of(prepared, 3, 10_000)
    first = inbox.submit(prepared, block[: len(block) // 2])
    second = inbox.submit(prepared, block[len(block) // 2 :])  # conflicts with the first
    inbox.claim(prepared)
    refused = inbox.get(prepared, second)
    assert (
        refused["status"] == "refused"
        and "conflicts with requests queued before" in (refused["reason"])
    )
    on_disk = b"".join(p.read_bytes() for p in inbox.inbox_dir(prepared).iterdir())
    assert not any(f'"{i}"'.encode() in on_disk for i in block[len(block) // 2 :])
    assert inbox.get(prepared, first)["status"] == "queued" and rid


def test_redact_replaces_every_id_by_its_keyed_hash():
    hasher = IdHasher(b"k" * 32)
    text = inbox.redact("unknown sample id(s) a:12, a:123", ["a:12", "a:123"], hasher)
    assert "a:12" not in text and text.count("<id:") == 2
    assert hasher("a:123")[:12] in text


def test_ids_forgotten_meanwhile_make_a_request_done_not_refused(prepared):
    wanted = ids_of(prepared, 2, 1)
    rid = inbox.submit(prepared, wanted)
    append_record(prepared.paths.audit, {"request_id": "del-direct",
                                         **IdHasher.of(prepared).hashes(wanted)})  # fmt: skip
    batch = inbox.claim(prepared)
    assert batch.ids == [] and [e["request_id"] for e in batch.accepted] == [rid]
    inbox.mark_done(prepared, batch)
    done = inbox.get(prepared, rid)
    assert done["status"] == "done" and "ids" not in done


def test_a_refused_deletion_finishes_its_requests_as_refused(prepared):
    [sid] = ids_of(prepared, 2, 1)
    rid = inbox.submit(prepared, [sid])
    batch = inbox.claim(prepared)
    inbox.mark_running(prepared, batch, "del-refused")
    journal = prepared.paths.state / "requests" / "del-refused.json"
    journal.parent.mkdir(parents=True, exist_ok=True)
    why = f"sample {sid!r} is in a damaged block; restore data/blocks"  # a reason naming the id
    journal.write_text(json.dumps({"status": "refused", "reason": why}))
    inbox.reconcile(prepared)
    entry = inbox.get(prepared, rid)
    hashed = f"<id:{IdHasher.of(prepared)(sid)[:12]}>"
    assert entry["status"] == "refused" and entry["reason"] == why.replace(sid, hashed)
    assert sid not in inbox.inbox_dir(prepared).joinpath(f"{rid}.json").read_text()


def test_a_drain_killed_before_the_metric_refresh_is_finished_by_the_same_forget(
    trained, monkeypatch
):
    from obliviate import deletion

    [sid] = ids_of(trained, 4, 1)

    def killed(cfg, after, trainer=None):
        raise SystemExit("killed")  # the deletion is applied, the metrics are not refreshed

    with monkeypatch.context() as m:
        m.setattr(deletion, "refresh_metrics", killed)
        with pytest.raises(SystemExit):
            deletion.forget(trained, [sid])
    (request,) = inbox.entries(trained)
    assert request["status"] == "running"  # not done before the metrics are
    assert not (trained.paths.metrics / "evaluate.json").exists()
    record = deletion.forget(trained, [sid])  # the same forget again: not "already forgotten"
    (again,) = inbox.entries(trained)
    assert again["status"] == "done" and "ids" not in again
    assert record["request_id"] == again["deletion"]
    assert (trained.paths.metrics / "evaluate.json").exists()  # the refresh it missed


def test_a_damaged_request_file_does_not_stop_queuing_another(prepared):
    folder = inbox.inbox_dir(prepared)
    folder.mkdir(parents=True)
    (folder / "req-20990101T000000-abcdef.json").write_text("{torn")
    assert inbox.submit(prepared, ids_of(prepared, 2, 1)).startswith("req-")


def test_redact_also_replaces_ids_as_messages_show_them():
    from obliviate.errors import shown_id

    hasher = IdHasher(b"k" * 32)
    odd, long = "café-1\n", "x/" * 100 + "img.png"  # escaped, and cut to 60 characters
    text = f"unknown sample id(s) {shown_id(odd)}, {shown_id(long)}"
    redacted = inbox.redact(text, [odd, long], hasher)
    assert "caf" not in redacted and "x/x/" not in redacted and redacted.count("<id:") == 2


def test_a_drain_builds_one_trainer_and_times_its_phases(trained, monkeypatch):
    """The fixed costs of a served deletion: the trainer the checks build is the one the sweep
    and the metric refresh use (building one costs about a small block's retraining), and the
    drain reports where its time went and when the deletion was committed."""
    import time

    from obliviate import deletion
    from obliviate.train import Trainer

    built = []
    real = Trainer.from_config.__func__

    def counting(cls, *args, **kwargs):
        built.append(1)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Trainer, "from_config", classmethod(counting))
    request = inbox.submit(trained, ids_of(trained, 4, 1))
    before = time.time()
    out = deletion.drain(trained, request)
    assert out.record is not None and inbox.get(trained, request)["status"] == "done"
    assert len(built) == 1
    assert set(out.seconds) == {"checks", "deletion", "refresh"}
    assert all(s > 0 for s in out.seconds.values())
    assert before < out.committed_unix < inbox.get(trained, request)["finished_unix"]
    (sweep,) = out.record["sweeps"]
    assert 0 < sweep["timings_s"]["retrain"] < sweep["timings_s"]["compute"]
    assert sweep["timings_s"]["compute"] < out.seconds["deletion"]
