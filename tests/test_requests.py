import json

import pytest

from obliviate.audit import Forgotten, IdHasher, append_record, legacy_id_hash
from obliviate.errors import RequestError
from obliviate.partition import load_block
from obliviate.requests import plan_deletion, read_request_file


def test_plan_groups_ids_by_block(prepared):
    a, b = (
        load_block(prepared.paths.blocks, 2).ids[:2],
        load_block(prepared.paths.blocks, 5).ids[:1],
    )
    plan = plan_deletion([*a, *b], prepared.paths.blocks, Forgotten.of(prepared))
    assert plan == {2: list(a), 5: list(b)}


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (["digits:1", "digits:1"], "repeats digits:1"),
        (["digits:999999"], r"unknown sample id\(s\) digits:999999"),
        ([], "names no sample ids"),
    ],
)
def test_bad_requests_are_refused_with_the_offending_ids(prepared, ids, message):
    blocks = prepared.paths.blocks
    known = str(load_block(blocks, 1).ids[0])
    ids = [known if i == "digits:1" else i for i in ids]
    with pytest.raises(RequestError, match=message.replace("digits:1", known)):
        plan_deletion(ids, blocks, Forgotten.of(prepared))


def test_already_forgotten_ids_are_refused(prepared):
    sid = str(load_block(prepared.paths.blocks, 1).ids[0])
    append_record(prepared.paths.audit, {"request_id": "r1", **IdHasher.of(prepared).hashes([sid])})
    with pytest.raises(RequestError, match=f"{sid} already forgotten"):
        plan_deletion([sid], prepared.paths.blocks, Forgotten.of(prepared))


def test_ids_in_an_audit_from_before_keyed_hashes_stay_forgotten(prepared):
    """Old records (no "id_hash" field) hold sha256("obliviate-sample:" + id): still refused."""
    old, new = (str(i) for i in load_block(prepared.paths.blocks, 1).ids[:2])
    append_record(
        prepared.paths.audit, {"request_id": "r0", "sample_id_hashes": [legacy_id_hash(old)]}
    )
    append_record(prepared.paths.audit, {"request_id": "r1", **IdHasher.of(prepared).hashes([new])})
    forgotten = Forgotten.of(prepared)
    for sid in (old, new):
        with pytest.raises(RequestError, match=f"{sid} already forgotten"):
            plan_deletion([sid], prepared.paths.blocks, forgotten)
    other = str(load_block(prepared.paths.blocks, 2).ids[0])
    assert plan_deletion([other], prepared.paths.blocks, forgotten) == {2: [other]}


def test_emptying_a_block_or_a_class_needs_force(prepared):
    block = load_block(prepared.paths.blocks, 3)
    with pytest.raises(RequestError, match=r"empty block\(s\) \[3\]; pass --force"):
        plan_deletion(list(block.ids), prepared.paths.blocks, Forgotten.of(prepared))
    assert plan_deletion(list(block.ids), prepared.paths.blocks, Forgotten.of(prepared), force=True)
    class_0 = []
    for k in range(1, prepared.prepare.blocks + 1):
        b = load_block(prepared.paths.blocks, k)
        class_0 += list(b.ids[b.y == 0])
    with pytest.raises(RequestError, match=r"every sample of class\(es\) \[0\]"):
        plan_deletion(class_0, prepared.paths.blocks, Forgotten.of(prepared))
    val = load_block(prepared.paths.blocks, 0)  # the validation split is a block of its own
    forgotten = Forgotten.of(prepared)
    assert plan_deletion([str(val.ids[0])], prepared.paths.blocks, forgotten) == {
        0: [str(val.ids[0])]
    }
    with pytest.raises(RequestError, match="empty the validation split"):
        plan_deletion(list(val.ids), prepared.paths.blocks, forgotten)


def test_request_files(tmp_path):
    good = tmp_path / "r.jsonl"
    good.write_text('"digits:1"\n{"id": "digits:2"}\n\n')
    assert read_request_file(good) == ["digits:1", "digits:2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"digits:1"\n{oops\n')
    with pytest.raises(RequestError, match=r"bad.jsonl:2 is not valid JSON"):
        read_request_file(bad)
    bad.write_text(json.dumps({"sample": "digits:1"}) + "\n")
    with pytest.raises(RequestError, match=r"bad.jsonl:1 has no sample id"):
        read_request_file(bad)


def test_messages_show_long_and_multiline_ids_in_one_short_line(prepared):
    forgotten = Forgotten.of(prepared)
    for sid in ("x" * 10_000, "digits:1\n", "digits:\u00e9\x00"):
        with pytest.raises(RequestError) as err:
            plan_deletion([sid], prepared.paths.blocks, forgotten)
        message = str(err.value)
        assert "\n" not in message and len(message) < 300, message
