"""Export a stored model as a plain state dict (safetensors or torch .pt) with a JSON sidecar.

The state dict is what ``model.state_dict()`` of the architecture holds, loadable with
``load_state_dict(strict=True)`` into a model built as the sidecar's ``architecture`` says. Row K
is P_K as ParamStore.read defines it (stitching shifts included); the default is the served row
P_B. The sidecar names the architecture (builder, stem, model_args, torch's printout of every
module), the preprocessing, the dataset's classes, the store's fingerprint and the deletions so
far, so a consumer needs neither obliviate nor guesses.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import asdict
from pathlib import Path

FORMATS = ("safetensors", "pt")


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def export_model(cfg, out: Path, fmt: str = "safetensors", row: int | None = None) -> dict:
    """Write row ``row`` (default: the served P_B) of the store to ``out`` and its sidecar to
    ``out`` + ``.json``; return the sidecar. Each file is written aside and renamed into place,
    so neither is ever seen half-written."""
    import torch

    from obliviate.audit import read_records
    from obliviate.errors import ObliviateError, StoreError, shown_path
    from obliviate.models import build_model, describe, layout, load_flat
    from obliviate.partition import dataset_info, read_manifest
    from obliviate.store import ParamStore

    if fmt not in FORMATS:
        raise ObliviateError(f"--format {fmt!r} is not supported; use safetensors or pt.")
    store = ParamStore.open(cfg.paths.store)
    store.require_complete()
    k = store.n_blocks if row is None else row
    if not 0 <= k <= store.n_blocks:
        raise StoreError(f"--row {k} is not a row of {store.path}; choose 0..{store.n_blocks}.")
    info = dataset_info(read_manifest(cfg.paths.blocks))
    t = cfg.train
    model = build_model(t.model, info.input_shape, info.n_classes, t.hidden,
                        t.model_args, t.small_stem, cfg.root)  # fmt: skip
    meta = store.meta
    store.require_layout(layout(model))
    if store.is_kept(k):
        theta, _ = store.read(k)
    else:  # a thinned store: replay row k from the nearest kept row below it, exactly as
        # stored training ran, which needs today's params, blocks, model and device class
        from obliviate.compat import require_usable
        from obliviate.rows import Rows
        from obliviate.train import Trainer

        trainer = Trainer.from_config(cfg)
        require_usable(cfg, store, trainer)
        theta, _ = Rows(store, trainer).read(k)
    load_flat(model, torch.from_numpy(theta))
    state = {name: v.detach().clone().contiguous() for name, v in model.state_dict().items()}
    arch = describe(t.model, model, info.input_shape, info.n_classes, t.hidden,
                    t.model_args, t.small_stem)  # fmt: skip
    d = asdict(info)
    sidecar = {
        "format": fmt,
        "row": k,
        "served": k == store.n_blocks,
        "architecture": arch,
        "preprocessing": {
            "input_shape": list(info.input_shape),
            "scale": info.scale,
            "input": "float32 tensor x / scale of shape (N, *input_shape)",
            "images": _image_steps(info) if info.image_root is not None else None,
        },
        "dataset": {
            "name": info.name,
            "n_classes": info.n_classes,
            "classes": d.get("classes") or list(range(info.n_classes)),
        },
        "store": {
            "path": str(store.path),
            "fingerprint": meta["fingerprint"],
            "n_blocks": store.n_blocks,
            "device": meta["extra"].get("device"),
        },
        "deletions": sum(r.get("kind") != "consolidation" for r in read_records(cfg.paths.audit)),
        "stitching_shifts": len(meta.get("shifts", [])),
        "exact_through": store.exact_through,  # rows 0..K bit-identical to a naive retrain's
        "torch": torch.__version__,
    }
    out = Path(out)
    tmp, tmp_side = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".json.tmp")
    made = []  # folders made for -o, removed again if writing fails
    try:
        if out.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder")
        made = [p for p in reversed(out.parents) if not p.exists()]
        above = next(p for p in out.parents if p.exists())
        if not above.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{shown_path(above)} is a file")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:  # every write error an OSError, whatever the format
            if fmt == "safetensors":
                from safetensors.torch import save

                f.write(save(state, metadata={"obliviate_row": str(k)}))
            else:
                torch.save(state, f)
        tmp_side.write_text(json.dumps(sidecar, indent=2) + "\n")
        os.replace(tmp, out)
        os.replace(tmp_side, sidecar_path(out))
    except OSError as exc:
        for p in (tmp, tmp_side):  # the temporary files first: the folders must be empty
            with contextlib.suppress(OSError):
                p.unlink(missing_ok=True)
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()
        raise ObliviateError(
            f"cannot write {shown_path(out)} ({exc.strerror or exc}); pass -o a file path in a "
            "writable folder."
        ) from None
    finally:
        for p in (tmp, tmp_side):
            with contextlib.suppress(OSError):
                p.unlink(missing_ok=True)
    return sidecar


def _image_steps(info) -> str:
    """How an image file becomes a model input, as `train.make_inputs` does it."""
    decode = "grayscale (16-bit / 257)" if info.input_shape[0] == 1 else "RGB (alpha dropped)"
    if info.resize is None:
        h, w = info.input_shape[1:]
        return f"decode as {decode}, at its own size {h}x{w}, then / scale"
    n = info.resize
    return f"decode as {decode}, resize the short side to {n}, center-crop to {n}x{n}, then / scale"
