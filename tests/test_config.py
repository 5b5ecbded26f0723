from pathlib import Path

import pytest
from conftest import ROOT, write_params

from obliviate.config import load_config
from obliviate.errors import ConfigError


def test_project_params_load_with_absolute_paths():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.prepare.dataset == "digits"
    assert cfg.paths.store == ROOT / "models" / "store.zarr"
    assert all(Path(p).is_absolute() for p in cfg.paths.model_dump().values())


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.epochz'.*valid keys.*epochs"):
        load_config(write_params(tmp_path, train={"epochz": 3}))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'prepare.blocks' is 'ten'"):
        load_config(write_params(tmp_path, prepare={"blocks": "ten"}))


def test_unknown_dataset_and_model_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"prepare\.dataset"):
        load_config(write_params(tmp_path, prepare={"dataset": "emnist"}))
    with pytest.raises(ConfigError, match=r"train\.model"):
        load_config(write_params(tmp_path, train={"model": "gpt2"}))


def test_missing_key_is_named(tmp_path):
    path = write_params(tmp_path)
    path.write_text(path.read_text().replace("  lr: 0.001\n", ""))
    with pytest.raises(ConfigError, match=r"'train.lr' is missing"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "params.yaml")


def test_fingerprint_tracks_params(tmp_path):
    a = load_config(write_params(tmp_path, train={"lr": 0.001}))
    b = load_config(write_params(tmp_path, train={"lr": 0.002}))
    assert a.fingerprint("prepare") == b.fingerprint("prepare")
    assert a.fingerprint("train") != b.fingerprint("train")


def test_model_and_device_names_are_checked(tmp_path):
    for model in ("torchvision:resnet18", "my_pkg.nets:build", "lenet5"):
        assert load_config(write_params(tmp_path, train={"model": model})).train.model == model
    with pytest.raises(ConfigError, match=r"'train.model' is 'my_pkg.MyNet'.*pkg\.module:factory"):
        load_config(write_params(tmp_path, train={"model": "my_pkg.MyNet"}))
    with pytest.raises(ConfigError, match=r"'evaluate.device' is 'tpu'.*auto, cpu, cuda"):
        load_config(write_params(tmp_path, evaluate={"device": "tpu"}))
    with pytest.raises(ConfigError, match=r"'train.precision' is 'fp16'"):
        load_config(write_params(tmp_path, train={"precision": "fp16"}))


def test_init_path_is_resolved_against_params(tmp_path):
    cfg = load_config(write_params(tmp_path, train={"init": "weights/p0.safetensors"}))
    assert cfg.train.init == tmp_path / "weights" / "p0.safetensors"


def test_the_guard_needs_a_validation_split(tmp_path):
    with pytest.raises(ConfigError, match=r"needs a validation split: set prepare\.val_fraction"):
        load_config(write_params(tmp_path, prepare={"val_fraction": 0.0}))
    cfg = load_config(
        write_params(tmp_path, prepare={"val_fraction": 0.0}, forget={"max_accuracy_drop": None})
    )
    assert cfg.forget.max_accuracy_drop is None


@pytest.mark.parametrize("cron", ["*/15 * *", "99 * * * *", "0 25 * * *", "a b c d e"])
def test_a_cron_schedule_is_parsed_not_only_counted(tmp_path, cron):
    with pytest.raises(ConfigError, match="not a 5-field cron schedule with valid values"):
        load_config(write_params(tmp_path, serve={"cron": cron}))
