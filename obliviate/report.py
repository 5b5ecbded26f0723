"""The evaluation report: a Table I-style grid and a Table VII-style comparison.

Everything runs in a scratch workspace built from params.yaml (partition and stored training
again, without a verifying owner), so the report measures the method on the configured data and
recipe, independent of the deletions the real workspace has seen. Every grid row carries the
do-nothing row beside it: the original model against naive retraining.

- grid: epsilon x number of deleted samples x position -> t, speed-up (naive wall / deletion
  wall, measured), accuracy of M' and of naive, consistency(M', naive) and
  consistency(original, naive), ||M' - naive||_1 / ||M_B - naive||_1;
- comparison: naive, obliviate and SISA (S shards x R slices, S*R = B) for one deletion of the
  middle block: accuracy, retrain speed-up, prediction cost, checkpoint storage.
"""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

import numpy as np

from obliviate.compare import naive_config
from obliviate.config import Config
from obliviate.evaluate import test_predictions
from obliviate.partition import load_block, load_samples
from obliviate.predict import predict

POSITIONS = ("first", "middle", "last")


# --------------------------------------------------------------------------- scratch workspace


def scratch_config(cfg: Config, folder: Path, **overrides: dict) -> Config:
    """cfg with every path inside ``folder`` (and section overrides, e.g. a benchmark case)."""
    from obliviate.data import DEFAULT_SOURCES

    def inside(p: Path) -> Path:
        return folder / (p.relative_to(cfg.root) if p.is_relative_to(cfg.root) else p.name)

    paths = {k: inside(Path(v)) for k, v in cfg.paths.model_dump().items()}
    update = {"paths": cfg.paths.model_copy(update=paths), "root": folder}
    default = DEFAULT_SOURCES[cfg.prepare.dataset]
    if cfg.prepare.source is None and default is not None and not default.is_absolute():
        update["prepare"] = cfg.prepare.model_copy(update={"source": cfg.root / default})
    for section, values in overrides.items():
        update[section] = update.get(section, getattr(cfg, section)).model_copy(update=values)
    return cfg.model_copy(update=update)


def build(cfg: Config, forgotten=frozenset()) -> None:
    """Partition and stored training in cfg's (scratch) paths, without a verifying owner and
    without the samples in ``forgotten`` (``audit.Forgotten`` of the real workspace)."""
    from obliviate.data import load_dataset
    from obliviate.partition import partition_dataset, without_forgotten
    from obliviate.train import stored_training

    ds = without_forgotten(load_dataset(cfg.prepare, cfg.root, cfg.train.image_size), forgotten)
    partition_dataset(ds, cfg.prepare, cfg.paths.blocks, cfg.paths.test)
    stored_training(cfg, overwrite=True)


def snapshot(cfg: Config, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    for src in (cfg.paths.blocks, cfg.paths.store):
        shutil.copytree(src, dest / src.name)


def restore(cfg: Config, src: Path) -> None:
    """Back to the snapshot: blocks and store, and no audit, journal, reports or naive model."""
    for dst in (cfg.paths.blocks, cfg.paths.store):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src / dst.name, dst)
    for p in (cfg.paths.audit, cfg.paths.state, cfg.paths.reports, cfg.paths.naive_store):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def pick(cfg: Config, n: int, position: str, skip: int = 0) -> list[str]:
    """n sample ids from the block at ``position``, spilling into its neighbours when n exceeds
    what a block can give (each block keeps its first sample of every class); ``skip`` passes
    over that many candidates first (another draw of the same size and position)."""
    n_blocks = cfg.prepare.blocks
    start = {"first": 1, "middle": n_blocks // 2, "last": n_blocks}[position]
    step = -1 if position == "last" else 1
    ids: list[str] = []
    k = start
    while len(ids) < n and 1 <= k <= n_blocks:
        block = load_block(cfg.paths.blocks, k)
        _, first_of_class = np.unique(block.y, return_index=True)
        spare = [str(s) for i, s in enumerate(block.ids) if i not in set(first_of_class)]
        taken = spare[skip:]
        skip = max(0, skip - len(spare))
        ids += taken[: n - len(ids)]
        k += step
    return ids


def l1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).sum())


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), its wall time in seconds)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def fastest(fn, *args, repeats: int = 5):
    """(fn(*args), its fastest wall time of ``repeats`` calls): for short calls such as a
    prediction pass, whose single timing is mostly noise."""
    runs = [timed(fn, *args) for _ in range(repeats)]
    return runs[0][0], min(s for _, s in runs)


# --------------------------------------------------------------------------- the grid


def grid(cfg: Config, epsilons, sizes, positions, pristine: Path) -> list[dict]:
    """Table I: one naive retrain per (size, position), one deletion per epsilon."""
    from obliviate.deletion import forget
    from obliviate.store import ParamStore
    from obliviate.train import Trainer, stored_training

    restore(cfg, pristine)
    trainer = Trainer.from_config(cfg)
    y = load_samples(cfg.paths.test).y
    original = ParamStore.open(cfg.paths.store).read(cfg.prepare.blocks)[0]
    p_orig = test_predictions(cfg, trainer, original)
    forget(cfg, pick(cfg, 1, "middle"), force=True, refresh=False)  # warm-up: first-use imports
    rows = []
    for n in sizes:
        for position in positions:
            naive = None
            for eps in epsilons:
                restore(cfg, pristine)
                run_cfg = cfg.model_copy(
                    update={"forget": cfg.forget.model_copy(update={"epsilon": eps})}
                )
                ids = pick(cfg, n, position)
                record, deletion_s = timed(forget, run_cfg, ids, force=True, refresh=False)
                if naive is None:  # naive does not depend on epsilon
                    store, naive_s = timed(stored_training, naive_config(cfg), overwrite=True)
                    naive = store.read(store.n_blocks)[0]
                    p_naive = test_predictions(cfg, trainer, naive)
                unlearned = ParamStore.open(cfg.paths.store).read(cfg.prepare.blocks)[0]
                p_unl = test_predictions(cfg, trainer, unlearned)
                rows.append({
                    "dataset": cfg.prepare.dataset, "model": cfg.train.model,
                    "B": cfg.prepare.blocks, "epsilon": eps, "samples": len(ids),
                    "position": position, "t": record["t"], "stop": record["reason"],
                    "speedup": naive_s / deletion_s, "deletion_s": deletion_s,
                    "naive_s": naive_s,
                    "non_training_share": 1 - record["timings_s"]["retrain"] / deletion_s,
                    "acc_unlearned": float((p_unl == y).mean()),
                    "acc_naive": float((p_naive == y).mean()),
                    "acc_original": float((p_orig == y).mean()),
                    "consistency": float((p_unl == p_naive).mean()),
                    "consistency_do_nothing": float((p_orig == p_naive).mean()),
                    "l1_ratio": l1(unlearned, naive) / max(l1(original, naive), 1e-30),
                })  # fmt: skip
    return rows


# --------------------------------------------------------------------------- the comparison


def comparison(cfg: Config, shard_counts, pristine: Path) -> list[dict]:
    """Table VII: naive, obliviate and SISA for one deletion in the middle block."""
    from obliviate.audit import Forgotten
    from obliviate.deletion import forget
    from obliviate.requests import plan_deletion
    from obliviate.sisa import forget_sisa, train_sisa, vote
    from obliviate.store import ParamStore
    from obliviate.train import Trainer, stored_training

    restore(cfg, pristine)
    trainer = Trainer.from_config(cfg)
    test = load_samples(cfg.paths.test)
    ids = pick(cfg, 1, "middle")
    plan = plan_deletion(ids, cfg.paths.blocks, Forgotten.of(cfg))
    forget(cfg, pick(cfg, 1, "first"), force=True, refresh=False)  # warm-up
    restore(cfg, pristine)
    _, obl_s = timed(forget, cfg, ids, refresh=False)
    store = ParamStore.open(cfg.paths.store)
    # prediction cost: one model against S, on the same test inputs already in memory
    p_obl, predict_s = fastest(
        predict, trainer, store.read_params(store.n_blocks), test.x, cfg.evaluate.batch_size
    )
    naive, naive_s = timed(stored_training, naive_config(cfg), overwrite=True)
    p_naive = test_predictions(cfg, trainer, naive.read(naive.n_blocks)[0])
    base = {"dataset": cfg.prepare.dataset, "model": cfg.train.model, "B": cfg.prepare.blocks}
    rows = [
        {**base, "method": "naive", "accuracy": float((p_naive == test.y).mean()),
         "retrain_s": naive_s, "speedup": 1.0, "predict_s": predict_s, "prediction_cost": 1.0,
         "storage_bytes": 0},
        {**base, "method": "obliviate", "accuracy": float((p_obl == test.y).mean()),
         "retrain_s": obl_s, "speedup": naive_s / obl_s, "predict_s": predict_s,
         "prediction_cost": 1.0, "storage_bytes": store.nbytes_raw()},
    ]  # fmt: skip
    restore(cfg, pristine)
    for shards in shard_counts:
        if cfg.prepare.blocks % shards:
            continue
        sisa = train_sisa(trainer, shards)
        sisa_s = forget_sisa(trainer, sisa, plan)
        n_classes = trainer.info.n_classes
        pred, s = fastest(vote, trainer, sisa, test.x, n_classes, cfg.evaluate.batch_size)
        rows.append({
            **base, "method": f"SISA S={shards} R={sisa.slices}",
            "accuracy": float((pred == test.y).mean()), "retrain_s": sisa_s,
            "speedup": naive_s / sisa_s, "predict_s": s, "prediction_cost": s / predict_s,
            "storage_bytes": sisa.storage_bytes(),
        })  # fmt: skip
    return rows


# --------------------------------------------------------------------------- output


def grid_markdown(rows: list[dict]) -> str:
    head = (
        "| data | B | eps | samples | position | t | stop | speed-up | acc M' | acc naive "
        "| cons(M', naive) | do-nothing cons(orig, naive) | L1 ratio | non-training |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['dataset']}/{r['model']} | {r['B']} | {r['epsilon']:g} | {r['samples']} "
        f"| {r['position']} | {r['t']} | {r['stop']} | {r['speedup']:.1f}x "
        f"| {r['acc_unlearned']:.4f} | {r['acc_naive']:.4f} | {r['consistency']:.4f} "
        f"| {r['consistency_do_nothing']:.4f} | {r['l1_ratio']:.3f} "
        f"| {r['non_training_share']:.0%} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def comparison_markdown(rows: list[dict]) -> str:
    head = (
        "| data | B | method | accuracy | retrain s | retrain speed-up | prediction cost "
        "| checkpoint storage (raw) |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['dataset']}/{r['model']} | {r['B']} | {r['method']} | {r['accuracy']:.4f} "
        f"| {r['retrain_s']:.2f} | {r['speedup']:.1f}x | {r['prediction_cost']:.1f}x "
        f"| {r['storage_bytes'] / 2**20:.1f} MiB |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def write_report(grid_rows: list[dict], comparison_rows: list[dict], folder: Path, command: str):
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(grid_rows, folder / "grid.csv")
    write_csv(comparison_rows, folder / "comparison.csv")
    text = (
        f"# obliviate evaluation report\n\nReproduce with `{command}`.\n\n"
        f"## Deletions (Table I style)\n\n{grid_markdown(grid_rows)}\n\n"
        f"## Naive, obliviate and SISA (Table VII style)\n\n"
        f"{comparison_markdown(comparison_rows)}\n"
    )
    (folder / "report.md").write_text(text)
    return folder / "report.md"


def run_report(cfg: Config, epsilons, sizes, positions, shards, scratch: Path) -> tuple[list, list]:
    """Build the scratch workspace, measure both tables, and remove the scratch copy again (it
    holds training samples: it must not outlive the report, nor hold forgotten samples)."""
    from obliviate.audit import Forgotten

    shutil.rmtree(scratch, ignore_errors=True)
    try:
        work = scratch_config(cfg, scratch / "ws", verify={"owner_block": 0})
        build(work, Forgotten.of(cfg))
        pristine = scratch / "pristine"
        snapshot(work, pristine)
        return grid(work, epsilons, sizes, positions, pristine), comparison(work, shards, pristine)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --------------------------------------------------------------------------- cost, up front


def estimated_blocks(cfg: Config) -> int:
    """Block trainings the report runs, at most: the scratch build, one naive retrain per
    (samples, position) and one for the comparison, SISA's shards, and every deletion's
    retraining (at most forget.max_blocks blocks each; the accuracy guard may go further)."""
    r, n_blocks = cfg.report, cfg.prepare.blocks
    cells = len(r.samples) * len(r.positions)
    shards = [s for s in r.shards if n_blocks % s == 0]
    deletions = cells * len(r.epsilons) + 3  # the grid, two warm-ups, the comparison's
    per_deletion = min(cfg.forget.max_blocks, n_blocks)
    sisa = len(shards) * n_blocks + sum(n_blocks // s for s in shards)
    return n_blocks * (1 + cells + 1) + deletions * per_deletion + sisa


def estimated_cost(cfg: Config, seconds_per_block: float | None) -> str:
    """One sentence on what the report will cost, printed before it starts."""
    n, b = estimated_blocks(cfg), cfg.prepare.blocks
    text = f"the report trains up to {n} blocks, {n / b:.1f} times a full training run of {b}"
    if seconds_per_block is None:
        return text + " (train once to get a time estimate)"
    minutes = n * seconds_per_block / 60
    return text + f"; at {seconds_per_block:.2f} s a block here, about {minutes:.1f} min"


def seconds_per_block(cfg: Config) -> float | None:
    """Block 1 trained once from P_0 on the partitioned data, timed; None before a partition."""
    from obliviate.partition import MANIFEST
    from obliviate.train import Trainer

    if not (cfg.paths.blocks / MANIFEST).is_file():
        return None
    trainer = Trainer.from_config(cfg)
    start = time.perf_counter()
    trainer.run_block(1, *trainer.initial_state())
    return time.perf_counter() - start
