"""Great Expectations gate for a block partition.

Checks, on tables of ids, block numbers, labels and counts (never sample contents):
unique ids, every id in exactly one block or the validation split (block 0) and every sample
covered, block sizes |D|//B or |D|//B + 1 and per-class counts within 1 of the ideal n_c / B in
every block (D: the samples outside the validation split), and every class in the validation
split.
great_expectations takes seconds to import, so it is imported inside ``check_partition``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from obliviate.errors import PartitionError


@dataclass(frozen=True)
class GateResult:
    success: bool
    lines: list[str]  # one line per expectation: verdict, what was checked, counts

    def report(self) -> str:
        return "\n".join(self.lines)


def partition_tables(
    ids: np.ndarray, labels: np.ndarray, blocks: list[np.ndarray], val: np.ndarray
):
    """The tables the gate checks: samples, block sizes, per-block label counts, validation."""
    import pandas as pd

    n_blocks = len(blocks)
    parts = [np.asarray(val, dtype=int), *blocks]
    block_of = np.concatenate([np.full(len(b), k) for k, b in enumerate(parts)])
    order = np.concatenate(parts)
    samples = pd.DataFrame({"sample_id": ids[order], "block": block_of, "label": labels[order]})
    sizes = pd.DataFrame({"block": np.arange(1, n_blocks + 1), "size": [len(b) for b in blocks]})
    classes = np.unique(labels)
    in_val = pd.Series(labels[parts[0]]).value_counts().reindex(classes, fill_value=0)
    validation = pd.DataFrame({"label": classes, "count": in_val.to_numpy()})
    class_n = pd.Series(labels).value_counts().reindex(classes).to_numpy() - in_val.to_numpy()
    counts = (
        samples[samples["block"] > 0]
        .groupby(["block", "label"])
        .size()
        .unstack(fill_value=0)
        .reindex(index=sizes["block"], columns=classes, fill_value=0)
    )
    balance = counts.stack().rename("count").reset_index()
    balance.columns = ["block", "label", "count"]
    ideal = dict(zip(classes, class_n / n_blocks, strict=True))
    balance["deviation"] = balance["count"] - balance["label"].map(ideal)
    return samples, sizes, balance, validation


def check_partition(
    ids: np.ndarray, labels: np.ndarray, blocks: list[np.ndarray], val: np.ndarray | None = None
) -> GateResult:
    """Run the Great Expectations suite on a partition of the samples (ids, labels) into blocks
    and the validation split ``val`` (indices; None or empty: no validation split)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    val = np.array([], dtype=int) if val is None else np.asarray(val, dtype=int)
    n, n_blocks = len(ids), len(blocks)
    samples, sizes, balance, validation = partition_tables(ids, labels, blocks, val)
    lo, hi = (n - len(val)) // n_blocks, -(-(n - len(val)) // n_blocks)

    E = gx.expectations
    suites = {
        "samples": [
            E.ExpectTableRowCountToEqual(value=n),  # every sample is in some block ...
            E.ExpectColumnValuesToBeUnique(column="sample_id"),  # ... and in exactly one
            E.ExpectColumnValuesToNotBeNull(column="sample_id"),
            E.ExpectColumnValuesToBeInSet(column="sample_id", value_set=list(ids)),
            E.ExpectColumnValuesToBeBetween(column="block", min_value=0, max_value=n_blocks),
        ],
        "block_sizes": [
            E.ExpectTableRowCountToEqual(value=n_blocks),
            E.ExpectColumnValuesToBeBetween(column="size", min_value=lo, max_value=hi),
        ],
        "label_balance": [
            E.ExpectColumnValuesToBeBetween(column="deviation", min_value=-1, max_value=1),
        ],
    }
    frames = {"samples": samples, "block_sizes": sizes, "label_balance": balance}
    if len(val):
        suites["validation"] = [E.ExpectColumnValuesToBeBetween(column="count", min_value=1)]
        frames["validation"] = validation

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("partition")
    lines, ok = [], True
    for table, expectations in suites.items():
        batch_def = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe(table)
        suite = gx.ExpectationSuite(name=f"partition_{table}", expectations=expectations)
        result = batch_def.get_batch(batch_parameters={"dataframe": frames[table]}).validate(suite)
        for r in result.results:
            ok &= bool(r.success)
            lines.append(_describe(table, r))
    return GateResult(ok, lines)


def _describe(table: str, r) -> str:
    """One report line. Counts only: values could be sample contents in another suite."""
    cfg = r.expectation_config
    args = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "value_set")}
    what = f"{cfg.type}({table}, {', '.join(f'{k}={v}' for k, v in args.items())})"
    res = r.result or {}
    if "unexpected_count" in res:
        detail = f"{res['unexpected_count']} of {res.get('element_count')} rows unexpected"
    else:
        detail = f"observed {res.get('observed_value')}"
    return f"{'PASS' if r.success else 'FAIL'} {what}: {detail}"


def require_valid_partition(ids, labels, blocks, val=None) -> GateResult:
    """Raise PartitionError with the readable report when the gate fails."""
    result = check_partition(ids, labels, blocks, val)
    if not result.success:
        failed = [line for line in result.lines if line.startswith("FAIL")]
        raise PartitionError(
            f"the partition failed {len(failed)} data-quality check(s) and was not written; "
            "fix the partition parameters:\n" + result.report()
        )
    return result
