"""GPU evidence: ResNet-18 on 3x32x32 images (Fashion-MNIST padded to 32x32 and tiled to three
channels), on the CUDA device. Measures, in one run:

- exact replay on the GPU: P_k retrained from the stored P_{k-1} equals the stored P_k, bit for
  bit, for a few k (deterministic algorithms, cuBLAS workspace, cuDNN deterministic);
- the stored-training overhead: the blockwise loop with and without writing P_k to the store;
- one deletion (a sample of the middle block) against naive retraining.

    python benchmarks/gpu.py --prepare data.npz      # once, where Fashion-MNIST is installed
    python benchmarks/gpu.py --data data.npz         # on the GPU machine (writes the docs table)
    python benchmarks/gpu.py --data data.npz --smoke --device cpu --no-docs   # a quick check

`--prepare` writes the image set as a compressed npz (about 40 MB, so it travels with the
working tree to a lent GPU machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import stamp

ROOT = stamp.ROOT
FASHION = Path("/usr/share/datasets/fashion-mnist")


def prepare(out: Path, n: int) -> None:
    """Fashion-MNIST's training set, padded to 32x32 and tiled to 3 channels, as x, y."""
    from obliviate.data import read_idx

    x = read_idx(FASHION / "train-images-idx3-ubyte.gz")[:n]
    y = read_idx(FASHION / "train-labels-idx1-ubyte.gz")[:n].astype(np.int64)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None].repeat(3, axis=1)  # (N, 3, 32, 32) uint8
    np.savez_compressed(out, x=x, y=y)
    print(f"wrote {out}: {x.shape} uint8, {out.stat().st_size / 2**20:.1f} MiB")


def config(data: Path, work: Path, device: str, smoke: bool):
    from obliviate.config import load_config

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["prepare"].update(dataset="npz", source=str(data.resolve()), blocks=8 if smoke else 100,
                          test_fraction=0.1)  # fmt: skip
    raw["train"].update(model="resnet18", device=device, epochs=1 if smoke else 2,
                        batch_size=64)  # fmt: skip
    raw["evaluate"]["device"] = device
    raw["verify"]["owner_block"] = 0
    raw["forget"].update(min_blocks=3 if smoke else 5, max_blocks=6 if smoke else 100)
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(work / "params.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prepare", type=Path, help="write the image set here and stop")
    parser.add_argument("--samples", type=int, default=60000)
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.npz")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="8 blocks, 1 epoch: a quick check")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the docs' table")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare, args.samples)
        return
    import torch

    from obliviate import report
    from obliviate.compare import naive_config
    from obliviate.deletion import forget
    from obliviate.evaluate import test_predictions
    from obliviate.partition import load_samples
    from obliviate.store import ParamStore
    from obliviate.train import Trainer, stored_training

    shutil.rmtree(args.out, ignore_errors=True)  # a fresh workspace: no audit of an earlier run
    cfg = config(args.data, args.out / "ws", args.device, args.smoke)
    report.build(cfg)  # partition and a first stored training (warm-up: CUDA context, kernels)
    trainer = Trainer.from_config(cfg)
    store = ParamStore.open(cfg.paths.store)
    replay = []
    for k in sorted({1, cfg.prepare.blocks // 2, cfg.prepare.blocks}):
        theta, _ = trainer.run_block(k, *store.read(k - 1))
        replay.append(bool(np.array_equal(theta.numpy(), store.read_params(k))))

    def plain(cfg) -> None:
        theta, opt = trainer.initial_state()
        for k in range(1, trainer.n_blocks + 1):
            theta, opt = trainer.run_block(k, theta, opt)

    _, plain_s = report.timed(plain, cfg)
    _, stored_s = report.timed(stored_training, cfg, overwrite=True)
    pristine = args.out / "pristine"
    report.snapshot(cfg, pristine)
    y = load_samples(cfg.paths.test).y
    record, deletion_s = report.timed(forget, cfg, report.pick(cfg, 1, "middle"), refresh=False)
    served = ParamStore.open(cfg.paths.store).read_params(cfg.prepare.blocks)
    naive, naive_s = report.timed(stored_training, naive_config(cfg), overwrite=True)
    acc = {
        "served": float((test_predictions(cfg, trainer, served) == y).mean()),
        "naive": float(
            (test_predictions(cfg, trainer, naive.read_params(naive.n_blocks)) == y).mean()
        ),
    }
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    row = {
        "device": device, "blocks": cfg.prepare.blocks, "replay_exact": replay,
        "plain_s": plain_s, "stored_s": stored_s, "overhead": stored_s / plain_s,
        "t": record["t"], "compute_s": record["timings_s"]["compute"], "deletion_s": deletion_s,
        "naive_s": naive_s, "acc_served": acc["served"], "acc_naive": acc["naive"],
    }  # fmt: skip
    print(json.dumps(row))
    table = (
        "| device | B | replay exact (rows 1, B/2, B) | stored / plain training | t "
        "| retraining speed-up | in-process speed-up | acc M' / naive |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {device} | {row['blocks']} | {', '.join(map(str, replay))} "
        f"| {stored_s:.1f} s / {plain_s:.1f} s = {row['overhead']:.2f} | {row['t']} "
        f"| {naive_s / row['compute_s']:.1f}x | {naive_s / deletion_s:.1f}x "
        f"| {acc['served']:.4f} / {acc['naive']:.4f} |"
    )
    print(table)
    if not args.no_docs:
        command = "python " + " ".join(["benchmarks/gpu.py", *sys.argv[1:]])
        stamp.write(ROOT / "docs" / "benchmarks.md", "gpu", table, command)


if __name__ == "__main__":
    main()
