"""The Great Expectations gate on partitions (imports GX: a few seconds)."""

import numpy as np
import pytest

from obliviate.errors import PartitionError
from obliviate.partition import balanced_partition
from obliviate.validate import check_partition, require_valid_partition

LABELS = np.repeat(np.arange(3), 20)
IDS = np.array([f"toy:{i}" for i in range(len(LABELS))])


def test_balanced_partition_passes():
    result = check_partition(IDS, LABELS, balanced_partition(LABELS, 4, 0))
    assert result.success, result.report()
    assert all(line.startswith("PASS") for line in result.lines)


def test_unbalanced_partition_is_rejected_with_a_readable_report():
    blocks = balanced_partition(LABELS, 4, 0)
    # Same sizes, but swap all class-0 samples of block 1 for class-1 samples of block 2.
    b1, b2 = blocks[0], blocks[1]
    c0, c1 = b1[LABELS[b1] == 0], b2[LABELS[b2] == 1]
    n = min(len(c0), len(c1))
    blocks[0] = np.concatenate([np.setdiff1d(b1, c0[:n]), c1[:n]])
    blocks[1] = np.concatenate([np.setdiff1d(b2, c1[:n]), c0[:n]])
    with pytest.raises(PartitionError) as err:
        require_valid_partition(IDS, LABELS, blocks)
    report = str(err.value)
    assert "FAIL expect_column_values_to_be_between(label_balance" in report
    assert "PASS expect_column_values_to_be_unique(samples" in report  # sizes and ids still fine
    assert "toy:" not in report  # counts only, no values copied into the report


def failed_checks(blocks) -> list[str]:
    result = check_partition(IDS, LABELS, blocks)
    assert result.success is False
    return [line.split("(")[0] for line in result.lines if line.startswith("FAIL")]


def test_a_sample_in_two_blocks_is_rejected():
    blocks = balanced_partition(LABELS, 4, 0)
    blocks[1] = np.concatenate([blocks[1], blocks[2][:1]])  # block 3's first sample, twice
    assert "FAIL expect_column_values_to_be_unique" in failed_checks(blocks)


def test_a_sample_in_no_block_is_rejected():
    blocks = balanced_partition(LABELS, 4, 0)
    blocks[3] = blocks[3][1:]
    assert "FAIL expect_table_row_count_to_equal" in failed_checks(blocks)


def test_a_validation_split_passes_and_a_sample_in_both_fails():
    from obliviate.partition import split_training

    val, blocks = split_training(LABELS, 0.1, 4, 0)
    assert check_partition(IDS, LABELS, blocks, val).success
    assert not set(val) & set(np.concatenate(blocks))
    leaked = [np.append(blocks[0], val[0]), *blocks[1:]]  # in the validation split and a block
    result = check_partition(IDS, LABELS, leaked, val)
    assert not result.success
    assert any("FAIL" in line and "unique" in line for line in result.lines)
