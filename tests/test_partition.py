import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obliviate.errors import PartitionError
from obliviate.partition import balanced_partition, load_block, read_manifest


@st.composite
def labels_and_blocks(draw):
    n_classes = draw(st.integers(1, 6))
    counts = draw(st.lists(st.integers(1, 40), min_size=n_classes, max_size=n_classes))
    labels = np.repeat(np.arange(n_classes), counts)
    labels = np.random.default_rng(draw(st.integers(0, 99))).permutation(labels)
    return labels, draw(st.integers(1, min(counts)))


@settings(max_examples=200, deadline=None)
@given(labels_and_blocks(), st.integers(0, 2**32 - 1))
def test_blocks_are_disjoint_cover_and_balanced(case, seed):
    labels, n_blocks = case
    blocks = balanced_partition(labels, n_blocks, seed)
    everything = np.concatenate(blocks)
    assert len(blocks) == n_blocks
    assert sorted(everything) == list(range(len(labels)))  # disjoint and covering
    sizes = {len(b) for b in blocks}
    assert sizes <= {len(labels) // n_blocks, len(labels) // n_blocks + 1}
    for c in np.unique(labels):
        ideal = (labels == c).sum() / n_blocks
        for b in blocks:
            assert abs((labels[b] == c).sum() - ideal) < 1


def test_partition_is_deterministic_per_seed():
    labels = np.repeat(np.arange(3), 30)
    a, b = balanced_partition(labels, 5, 7), balanced_partition(labels, 5, 7)
    c = balanced_partition(labels, 5, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_too_many_blocks_is_refused():
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(PartitionError, match=r"3 samples of class 1.*at most 3"):
        balanced_partition(labels, 4, 0)
    with pytest.raises(PartitionError, match="exceeds the 13 samples"):
        balanced_partition(labels, 14, 0)


def test_written_blocks_hold_the_samples(prepared):
    cfg = prepared
    manifest = read_manifest(cfg.paths.blocks)
    assert manifest["n_blocks"] == cfg.prepare.blocks
    ids = []
    for k in range(1, manifest["n_blocks"] + 1):
        block = load_block(cfg.paths.blocks, k)
        assert len(block.ids) == len(block.y) == len(block.x) == manifest["blocks"][k - 1]["n"]
        assert block.x.shape[1:] == (1, 8, 8)
        ids.extend(block.ids)
    assert len(ids) == len(set(ids)) == manifest["n_samples"]
    assert all(i.startswith("digits:") for i in ids)


def test_forgotten_samples_stay_out_of_a_new_partition(small_cfg):
    from obliviate.audit import Forgotten, IdHasher, append_record
    from obliviate.data import load_dataset
    from obliviate.partition import without_forgotten

    ds = load_dataset(small_cfg.prepare, small_cfg.root)
    gone = IdHasher.of(small_cfg).hashes(ds.train.ids[:3])
    append_record(small_cfg.paths.audit, {"request_id": "r1", **gone})
    kept = without_forgotten(ds, Forgotten.of(small_cfg))
    assert len(kept.train) == len(ds.train) - 3
    assert not set(ds.train.ids[:3]) & set(kept.train.ids)
