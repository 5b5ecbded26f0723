"""Stored training (paper Section IV-A): train blocks 1..B in order and keep every P_k.

The unit of work is ``train_block``: a pure function of (P_{k-1}, optimizer state, block k,
recipe, k). Stored training calls it for k = 1..B; replay and deletion call the very same function
from a stored row. Because the model and optimizer are rebuilt from the row at every block, the
replay of block k from the stored P_{k-1} reproduces P_k bit for bit (same device class and
threads). On CUDA, deterministic kernels (cuBLAS workspace, cuDNN deterministic, no benchmark)
keep it so; rows always come back to the CPU before they are stored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from obliviate.compat import init_digest, require_same_device, store_fingerprint
from obliviate.config import Config, TrainConfig
from obliviate.data import DatasetInfo, Samples
from obliviate.device import configure_determinism, determinism_error, device_record, resolve_device
from obliviate.errors import ConfigError, DataError, StoreError
from obliviate.models import (
    build_model,
    describe,
    flatten,
    layout,
    load_flat,
    load_init,
    require_exact_batchnorm,
)
from obliviate.partition import dataset_info, load_block, read_manifest
from obliviate.store import ParamStore, StoreMeta
from obliviate.store_writer import RowWriter

# Optimizer state kept per parameter, in this order, when the recipe carries it across blocks.
_STATE_KEYS = {"sgd": ("momentum_buffer",), "adam": ("step", "exp_avg", "exp_avg_sq")}
_STATE_KEYS["adamw"] = _STATE_KEYS["adam"]


def block_seed(seed: int, k: int) -> int:
    """The seed of block k: shuffling and dropout in block k depend on nothing else."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0])


def block_lr(recipe: TrainConfig, k: int, n_blocks: int) -> float:
    """Learning rate for block k (1-based); a pure function of k, so no scheduler state."""
    if recipe.lr_schedule == "constant" or n_blocks == 1:
        return recipe.lr
    progress = (k - 1) / (n_blocks - 1)
    return recipe.lr * (
        recipe.lr_final + (1 - recipe.lr_final) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def state_keys(recipe: TrainConfig) -> tuple[str, ...]:
    if not recipe.keep_optimizer_state or (recipe.optimizer == "sgd" and recipe.momentum == 0):
        return ()
    return _STATE_KEYS[recipe.optimizer]


def optimizer_layout(model: nn.Module, recipe: TrainConfig) -> list[dict]:
    entries, offset = [], 0
    for i, p in enumerate(model.parameters()):
        for key in state_keys(recipe):
            size = 1 if key == "step" else p.numel()
            entries.append({"param": i, "key": key, "offset": offset, "size": size})
            offset += size
    return entries


def make_optimizer(model: nn.Module, recipe: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
    cls = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=lr, weight_decay=recipe.weight_decay)


def flatten_optimizer(opt: torch.optim.Optimizer, model: nn.Module, recipe: TrainConfig):
    keys = state_keys(recipe)
    if not keys:
        return None
    parts = []
    for p in model.parameters():
        state = opt.state.get(p, {})
        for key in keys:
            t = state.get(key)
            t = torch.zeros(1 if key == "step" else p.numel()) if t is None else t
            parts.append(t.detach().reshape(-1).float().cpu())
    return torch.cat(parts)


def load_optimizer(opt, model: nn.Module, recipe: TrainConfig, vector: torch.Tensor) -> None:
    entries = iter(optimizer_layout(model, recipe))
    params = list(model.parameters())
    vector = vector.cpu()  # Adam keeps "step" on the CPU (not capturable), moments on p's device
    on_device = vector.to(params[0].device) if params else vector
    for p in params:
        state = {}
        for key in state_keys(recipe):
            e = next(entries)
            lo, hi = e["offset"], e["offset"] + e["size"]
            state[key] = (
                vector[lo].clone() if key == "step" else on_device[lo:hi].view(p.shape).clone()
            )
        opt.state[p] = state


@dataclass(frozen=True)
class Parallel:
    """This process's place in a data-parallel run (torch.distributed, started by torchrun).

    Every rank draws the same batches; rank r trains on rows r, r+size, ... of each batch and the
    gradients are summed across ranks, so one step equals the single-process step up to the
    order of floating-point additions. For a fixed size the sums are deterministic (gloo's ring
    order), so replay stays exact for that size.
    """

    rank: int = 0
    size: int = 1

    @classmethod
    def from_torch(cls) -> Parallel:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size())

    def agree(self, error: str | None) -> None:
        """Rank 0's outcome on every rank: raise its error everywhere, so that no rank is left
        waiting in a collective for a rank that gave up."""
        if self.size > 1:
            import torch.distributed as dist

            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise StoreError(error)

    def share(self, value):
        """Rank 0's ``value`` on every rank (one broadcast; a single process keeps its own)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_grads(self, model: nn.Module) -> None:
        """Sum the gradients of every rank (one flat all-reduce; missing grads count as 0)."""
        import torch.distributed as dist

        params = list(model.parameters())
        flat = torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params
        ])  # fmt: skip
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n


SINGLE = Parallel()
CPU = torch.device("cpu")


def make_inputs(info: DatasetInfo) -> Callable[[np.ndarray], torch.Tensor]:
    """x rows of a block -> float model inputs (N, *input_shape)."""
    if info.image_root is None:
        return lambda x: torch.from_numpy(np.asarray(x, dtype=np.float32) / np.float32(info.scale))

    from torchvision.transforms.v2.functional import center_crop, resize

    from obliviate.data import read_image
    from obliviate.trigger import split_trigger, stamp_trigger

    root = Path(info.image_root)

    def load(paths: np.ndarray) -> torch.Tensor:
        marked = [split_trigger(str(p)) for p in paths]  # the verifying owner's are marked
        channels, size = info.input_shape[0], info.resize
        imgs = [read_image(root / p, channels) for p, _ in marked]
        if size is not None:
            imgs = [center_crop(resize(i, [size]), [size]) for i in imgs]
        for img, (p, _) in zip(imgs, marked, strict=True):
            if tuple(img.shape) != tuple(info.input_shape):
                raise DataError(
                    f"{root / p} is {img.shape[1]}x{img.shape[2]}, not the "
                    f"{info.input_shape[1]}x{info.input_shape[2]} the blocks were written with; "
                    "restore it, or set train.image_size and rerun `obliviate partition`."
                )
        imgs = [
            stamp_trigger(i, spec, info.scale) for i, (_, spec) in zip(imgs, marked, strict=True)
        ]
        return torch.stack(imgs).float() / info.scale

    return load


@dataclass(frozen=True)
class Loader:
    """How batches of image paths are decoded: a DataLoader with this many worker processes
    (seeded, in order) and pinned memory for a GPU. Decoding is deterministic, so the inputs,
    and with them replay, do not depend on it."""

    workers: int = 0
    pin_memory: bool = False


IN_PROCESS = Loader()


class _Rows(torch.utils.data.Dataset):
    """Index arrays -> model inputs of those rows (a DataLoader dataset with batch_size=None)."""

    def __init__(self, x: np.ndarray, to_inputs: Callable[[np.ndarray], torch.Tensor]):
        self.x, self.to_inputs = x, to_inputs

    def __getitem__(self, rows: np.ndarray) -> torch.Tensor:
        return self.to_inputs(self.x[rows])


def _seed_worker(worker_id: int) -> None:
    np.random.seed(torch.initial_seed() % 2**32)  # torch seeds each worker from base_seed + id


def batch_inputs(
    x: np.ndarray, batches: list[np.ndarray], to_inputs, loader: Loader, seed: int
) -> Iterator[torch.Tensor | None]:
    """The inputs of each batch (None for an empty one), in order."""
    if loader.workers == 0 and not loader.pin_memory:
        return (to_inputs(x[b]) if len(b) else None for b in batches)
    wanted = [b for b in batches if len(b)]
    data = torch.utils.data.DataLoader(
        _Rows(x, to_inputs),
        batch_size=None,
        sampler=wanted,
        num_workers=loader.workers,
        pin_memory=loader.pin_memory,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),  # not the global RNG: dropout uses it
    )
    it = iter(data)
    return (next(it) if len(b) else None for b in batches)


def train_block(
    model: nn.Module,
    theta: torch.Tensor,
    opt_state: torch.Tensor | None,
    block: Samples,
    n_slots: int,
    recipe: TrainConfig,
    k: int,
    n_blocks: int,
    to_inputs: Callable[[np.ndarray], torch.Tensor],
    lr: float | None = None,
    parallel: Parallel = SINGLE,
    loader: Loader = IN_PROCESS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Train block k for recipe.epochs epochs from (theta, opt_state); return the new pair.

    theta: (|theta|,) float32, P_{k-1}. Returns P_k and the optimizer state after block k, on
    the CPU whatever device ``model`` is on.

    Batches are drawn over the block's ``n_slots`` original positions, and a forgotten sample
    leaves a hole in its batch: retraining a reduced block sees the same batches minus the
    forgotten samples, rather than a reshuffled block. So Delta measures the samples' influence,
    not reshuffling noise, and the retrained models stay close to the original trajectory.
    """
    x, y = block.x, block.y
    slot = np.arange(len(y)) if block.slot is None else block.slot
    position = np.full(n_slots, -1)
    position[slot] = np.arange(len(y))  # slot -> row of the (reduced) block, -1 if forgotten
    device = next(model.parameters()).device
    load_flat(model, torch.as_tensor(theta))
    opt = make_optimizer(model, recipe, block_lr(recipe, k, n_blocks) if lr is None else lr)
    if opt_state is not None:
        load_optimizer(opt, model, recipe, torch.as_tensor(opt_state))
    seed = block_seed(recipe.seed, k)
    torch.manual_seed(seed)  # dropout and any other global-RNG use inside the block
    order_rng = torch.Generator().manual_seed(seed)
    steps = []  # (batch, the rows this process feeds forward): every epoch's batches, in order
    for _ in range(recipe.epochs):
        order = torch.randperm(n_slots, generator=order_rng).numpy()  # within the block only
        for start in range(0, n_slots, recipe.batch_size):
            idx = position[order[start : start + recipe.batch_size]]
            idx = idx[idx >= 0]
            if len(idx):  # else every sample of this batch was forgotten
                mine = idx if parallel.size == 1 else idx[parallel.rank :: parallel.size]
                steps.append((idx, mine))
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
    loss_fn = nn.CrossEntropyLoss()
    sum_loss = nn.CrossEntropyLoss(reduction="sum")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.precision == "bf16")
    inputs = batch_inputs(x, [rows for _, rows in steps], to_inputs, loader, seed)
    model.train()
    try:
        for (idx, rows), xb in zip(steps, inputs, strict=True):
            opt.zero_grad(set_to_none=True)
            if parallel.size == 1:
                with autocast:
                    out = model(xb.to(device, non_blocking=True))  # (b, classes)
                loss_fn(out.float(), labels[idx]).backward()
            else:  # this rank's share of the batch; the mean is over the whole batch
                if len(rows):
                    with autocast:
                        out = model(xb.to(device, non_blocking=True))
                    (sum_loss(out.float(), labels[rows]) / len(idx)).backward()
                parallel.all_reduce_grads(model)
            opt.step()
    except RuntimeError as exc:
        error = determinism_error(exc)
        if error is None:
            raise
        raise error from None
    except ValueError as exc:  # BatchNorm's rule: more than one sample per batch in training
        if "Expected more than 1 value per channel" not in str(exc):
            raise
        raise ConfigError(
            f"block {k} has a training batch of a single sample, which BatchNorm cannot train "
            "on; change train.batch_size so that no batch of a block holds one sample."
        ) from None
    return flatten(model), flatten_optimizer(opt, model, recipe)


@dataclass(frozen=True)
class Trainer:
    """Everything block training needs besides the state: model, recipe, data access."""

    model: nn.Module
    recipe: TrainConfig
    info: DatasetInfo
    blocks_dir: Path
    n_blocks: int
    slots: tuple[int, ...]  # original size of each block
    to_inputs: Callable[[np.ndarray], torch.Tensor]
    p0: torch.Tensor  # P_0: built from the seed (or train.init) on the CPU; training moves model
    parallel: Parallel = SINGLE  # data-parallel rank and size (torchrun); single by default
    device: torch.device = CPU  # where the model trains and predicts
    architecture: dict | None = None  # models.describe: the model named fully (store attrs)
    loader: Loader = IN_PROCESS  # how image-path batches are decoded

    @classmethod
    def from_config(
        cls, cfg: Config, device: str | None = None, key: str = "train.device"
    ) -> Trainer:
        """The trainer of cfg on ``device`` (default train.device; evaluation passes its own,
        named ``key`` in errors)."""
        manifest = read_manifest(cfg.paths.blocks)
        info = dataset_info(manifest)
        t = cfg.train
        configure_determinism(t.threads)  # before CUDA is touched: the cuBLAS workspace setting
        where = resolve_device(device or t.device, key)
        torch.manual_seed(t.seed)  # P_0 depends on the seed alone, on any device (built on CPU)
        model = build_model(t.model, info.input_shape, info.n_classes, t.hidden,
                            t.model_args, t.small_stem, cfg.root)  # fmt: skip
        require_exact_batchnorm(model)
        if t.init is not None:
            load_init(model, t.init)
        arch = describe(t.model, model, info.input_shape, info.n_classes, t.hidden,
                        t.model_args, t.small_stem)  # fmt: skip
        p0 = flatten(model)
        workers = t.workers if info.image_root is not None else 0
        return cls(
            model.to(where),
            t,
            info,
            cfg.paths.blocks,
            manifest["n_blocks"],
            tuple(b["slots"] for b in manifest["blocks"]),
            make_inputs(info),
            p0,
            Parallel.from_torch(),
            where,
            arch,
            Loader(workers, pin_memory=where.type == "cuda" and info.image_root is not None),
        )

    def initial_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """P_0 (the model as built from the seed) and a zero optimizer state."""
        n_opt = sum(e["size"] for e in optimizer_layout(self.model, self.recipe))
        return self.p0.clone(), (torch.zeros(n_opt) if n_opt else None)

    def run_block(self, k: int, theta, opt_state):
        return self.train_samples(k, theta, opt_state, load_block(self.blocks_dir, k))

    def train_samples(self, k: int, theta, opt_state, block: Samples, lr: float | None = None):
        """Train block k's recipe (seed, lr) on ``block``: the stored block or a reduced one.

        ``lr`` overrides the schedule (SISA runs the schedule over each shard's own slices)."""
        return train_block(
            self.model,
            theta,
            opt_state,
            block,
            self.slots[k - 1],
            self.recipe,
            k,
            self.n_blocks,
            self.to_inputs,
            lr,
            self.parallel,
            self.loader,
        )


def open_or_create_store(cfg: Config, trainer: Trainer, overwrite: bool) -> ParamStore:
    """Resume a store built with the same params; refuse one built with others."""
    fingerprint = store_fingerprint(cfg)
    path = cfg.paths.store
    if (path / "zarr.json").is_file() and not overwrite:
        store = ParamStore.open(path)
        if store.meta["fingerprint"] != fingerprint:
            raise StoreError(
                f"{path} was built with other params or blocks; pass --overwrite to replace it "
                "(or restore the params it was built with)."
            )
        size = store.meta["extra"].get("parallel_size", 1)
        if size != trainer.parallel.size:
            raise StoreError(
                f"{path} is being trained by {size} process(es), and replay is exact only for "
                f"that number; resume with {size} (torchrun --nproc-per-node {size}) or pass "
                "--overwrite."
            )
        return store
    if path.exists() and not overwrite:
        raise StoreError(
            f"{path} exists but is not a parameter store; move it away or pass --overwrite."
        )
    theta, opt = trainer.initial_state()
    meta = StoreMeta(
        fingerprint=fingerprint,
        n_blocks=trainer.n_blocks,
        store_every=cfg.train.store_every,
        layout=[asdict(e) for e in layout(trainer.model)],
        optimizer_layout=optimizer_layout(trainer.model, trainer.recipe),
        extra={
            "dataset": asdict(trainer.info),
            "recipe": trainer.recipe.model_dump(mode="json"),
            "parallel_size": trainer.parallel.size,
            "architecture": trainer.architecture,
            "device": device_record(trainer.device, trainer.recipe.threads),
            "init_sha256": None if cfg.train.init is None else init_digest(cfg.train.init),
        },
    )
    store = ParamStore.create(path, meta, len(theta), 0 if opt is None else len(opt))
    store.write(0, theta.numpy(), None if opt is None else opt.numpy())
    return store


def require_data_parallel_exact(model: nn.Module) -> None:
    """Splitting a batch across processes equals one process only without batch statistics or
    random masks; BatchNorm and Dropout would make the store differ from one-process replay."""
    inexact = (nn.modules.batchnorm._BatchNorm, nn.Dropout)
    if any(isinstance(m, inexact) for m in model.modules()):
        raise StoreError(
            "data-parallel training is exact only for models without BatchNorm or Dropout "
            "(lenet5, mlp); train this model in one process (`obliviate train`)."
        )


def stored_training(
    cfg: Config,
    overwrite: bool = False,
    on_block: Callable[[int, int], None] | None = None,
    allow_inexact: bool = False,
) -> ParamStore:
    """Train blocks completed+1..B, writing P_k after each; resumable, refuses foreign stores.

    ``on_block(k, n_samples)`` is called after block k is trained (for progress bars). Under
    torchrun every rank trains and rank 0 alone writes the store. Resuming on another device
    class is refused unless ``allow_inexact`` (see require_same_device).
    """
    trainer = Trainer.from_config(cfg)
    par = trainer.parallel
    if par.size > 1:
        require_data_parallel_exact(trainer.model)
        if cfg.train.store_every > 1:  # replaying the rows between kept ones is one process's
            raise StoreError(
                "train.store_every > 1 needs one training process (a row between kept ones is "
                "replayed by one process); set train.store_every: 1 or train without torchrun."
            )
    error = None
    if par.rank == 0:
        try:
            store = open_or_create_store(cfg, trainer, overwrite)
            if store.completed < trainer.n_blocks:  # a resume replays on this device
                require_same_device(store, trainer, allow_inexact)
        except StoreError as exc:
            error = str(exc)
    par.agree(error)  # the other ranks open the store once rank 0 has created or checked it
    if par.rank != 0:
        store = ParamStore.open(cfg.paths.store)
    theta, opt = store.read(store.completed)
    writing = RowWriter(store) if par.rank == 0 else contextlib.nullcontext()
    with writing as writer:
        for k in range(store.completed + 1, trainer.n_blocks + 1):
            theta, opt = trainer.run_block(k, theta, opt)
            if writer is not None and store.is_kept(k):  # train.store_every: the rest replay
                writer.put(k, theta, opt)
            if on_block:
                on_block(k, trainer.n_blocks)
    par.barrier()
    store = ParamStore.open(cfg.paths.store)  # the writer process changed it
    if par.rank == 0:
        from obliviate.guard import record_reference

        record_reference(cfg, store, trainer)  # the accuracy guard's yardstick
    return store
