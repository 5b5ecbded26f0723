"""Data-parallel stored training under torchrun: every rank trains each block on its share of
every batch (gradients summed with torch.distributed), and rank 0 alone writes the store.

    obliviate partition
    torchrun --nproc-per-node 2 -m obliviate.distributed --params params.yaml
    torchrun --nproc-per-node 2 -m obliviate.distributed --params params.yaml --consolidate

Backend gloo (training runs on the CPU). The store records the number of processes: a resume
must use the same number, because replay is exact only for it. Deletions replay blocks in one
process, so for a store trained by N > 1 processes the residual memory Delta also holds the
difference between N-process and one-process arithmetic (tests/test_distributed.py measures it),
and their rows are approximate: ``--consolidate`` retrains them with N processes again, which
gives the bytes N-process stored training gives (the same number of processes, the same sums).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", "-p", type=Path, default=Path("params.yaml"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
    parser.add_argument("--consolidate", action="store_true",
                        help="make every deletion exact (see `obliviate consolidate`)")  # fmt: skip
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from obliviate.config import load_config
    from obliviate.errors import ObliviateError
    from obliviate.train import Parallel, stored_training
    from obliviate.transaction import LockError, State

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    held = contextlib.ExitStack()
    try:
        cfg = load_config(args.params)
        if args.consolidate:
            from obliviate.consolidation import consolidate

            done = consolidate(cfg)
            if rank == 0:
                r = done.record
                print("every row is exact already" if r is None else
                      f"consolidated blocks {r['first_block']}..{r['stop_block']} with "
                      f"{dist.get_world_size()} processes: served model sha256 "
                      f"{r['model_after'][:16]}")  # fmt: skip
            return 0
        error = None
        if rank == 0:  # rank 0 writes the store, so it takes the writer lock deletions take
            try:
                held.enter_context(State.of(cfg).lock(wait=0, can_wait=False))
            except LockError as exc:
                error = str(exc)
        Parallel.from_torch().agree(error)  # every rank stops, or none does
        store = stored_training(cfg, overwrite=args.overwrite)
        if rank == 0:
            s = store.summary()
            print(f"stored {s['completed']}/{s['blocks']} blocks with {dist.get_world_size()} "
                  f"processes in {s['store']}")  # fmt: skip
        return 0
    except ObliviateError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        held.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
