"""A thinned store (`train.store_every: s`): only P_0, P_B and every s-th row are written, and
every other row is rebuilt by replay, byte for byte what a store with s = 1 holds."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL, Interrupted, crash_after, prepare, write_params

from obliviate.config import load_config
from obliviate.errors import StoreError
from obliviate.rows import Rows
from obliviate.store import ParamStore
from obliviate.train import Trainer, stored_training


def bits(a) -> bytes:
    return np.ascontiguousarray(a, "<f4").tobytes()


def workspace(tmp_path, s: int, **train):
    cfg = load_config(
        write_params(tmp_path, **{**SMALL, "train": {**SMALL["train"], "store_every": s, **train}})
    )
    prepare(cfg)
    return cfg


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The s = 1 reference stores: with Adam's moments kept, and without optimizer state."""
    out = {}
    for keep in (True, False):
        cfg = workspace(tmp_path_factory.mktemp(f"full-{keep}"), 1, keep_optimizer_state=keep)
        out[keep] = (cfg, stored_training(cfg))
    return out


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("s", [2, 4, 7])
def test_every_row_of_a_thinned_store_reads_as_the_full_store_holds_it(full, tmp_path, s, keep):
    _, reference = full[keep]
    cfg = workspace(tmp_path, s, keep_optimizer_state=keep)
    store = stored_training(cfg)
    n = store.n_blocks  # 6
    kept = [k for k in range(n + 1) if k % s == 0 or k == n]
    assert store.kept_rows() == kept and store.meta["store_every"] == s
    # only the kept rows are on disk, and a plain zarr reader sees which (the attrs)
    assert sorted(int(p.name) for p in (cfg.paths.store / "params" / "c").iterdir()) == kept
    assert store.nbytes_stored() < reference.nbytes_stored() * (len(kept) + 1) / (n + 1)
    with pytest.raises(StoreError, match=r"row 1 is not one of them"):
        store.read(1) if 1 not in kept else (_ for _ in ()).throw(
            StoreError("row 1 is not one of them")
        )
    rows = Rows(store, Trainer.from_config(cfg))
    for k in [*range(n + 1), 3, 1]:  # in order, then back again (replayed from scratch)
        theta, opt = rows.read(k)
        want_theta, want_opt = reference.read(k)
        assert bits(theta) == bits(want_theta), k
        assert (opt is None) == (want_opt is None) and (opt is None or bits(opt) == bits(want_opt))


def test_thinned_training_resumes_after_an_interruption_to_the_same_bytes(full, tmp_path):
    _, reference = full[True]
    cfg = workspace(tmp_path, 4)
    with pytest.raises(Interrupted):
        stored_training(cfg, on_block=crash_after(5))
    assert ParamStore.open(cfg.paths.store).completed == 4  # the last kept row written
    store = stored_training(cfg)
    for k in (0, 4, 6):
        assert bits(store.read(k)[0]) == bits(reference.read(k)[0])
        assert bits(store.read(k)[1]) == bits(reference.read(k)[1])


def test_export_of_any_row_and_a_store_read_with_another_s(full, tmp_path):
    from safetensors.numpy import load_file

    ref_cfg, _ = full[True]
    cfg = workspace(tmp_path, 4)
    stored_training(cfg)

    def export(params, row, out):
        return subprocess.run(
            [sys.executable, "-m", "obliviate.cli", "export", "-o", str(out), "--row", str(row),
             "--params", str(params)], capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    for row in (3, 4):  # replayed, stored
        got = export(cfg.root / "params.yaml", row, tmp_path / f"thin{row}.safetensors")
        want = export(ref_cfg.root / "params.yaml", row, tmp_path / f"full{row}.safetensors")
        assert got.returncode == 0 and want.returncode == 0, got.stderr + want.stderr
        a, b = (load_file(tmp_path / f"{w}{row}.safetensors") for w in ("thin", "full"))
        assert a.keys() == b.keys() and all(bits(a[k]) == bits(b[k]) for k in a)
    # params.yaml changed to another s: one sentence, never a wrong model
    write_params(tmp_path, **{**SMALL, "train": {**SMALL["train"], "store_every": 2}})
    other = export(cfg.root / "params.yaml", 3, tmp_path / "other.safetensors")
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert "keeps every 4th row but params.yaml sets train.store_every: 2" in other.stderr
    assert not (tmp_path / "other.safetensors").exists()
    info = json.loads((cfg.paths.store / "params" / "zarr.json").read_text())
    assert info["attributes"]["obliviate"]["store_every"] == 4
