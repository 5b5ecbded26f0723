import pytest
import torch

from obliviate.errors import ConfigError
from obliviate.models import build_model, flatten, layout, load_flat


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [
        ("lenet5", (1, 8, 8), 10),
        ("lenet5", (1, 28, 28), 10),
        ("mlp", (17,), 2),
        ("resnet18", (3, 32, 32), 10),
        ("vgg11", (3, 32, 32), 10),
        ("resnet50", (3, 64, 64), 7),
    ],
)
def test_models_adapt_to_input_and_classes(name, shape, classes):
    torch.manual_seed(0)
    model = build_model(name, shape, classes).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, *shape)).shape == (2, classes)


def test_flat_vector_round_trips_exactly():
    torch.manual_seed(0)
    model = build_model("resnet18", (1, 32, 32), 10)
    vec = flatten(model)
    entries = layout(model)
    assert vec.dtype == torch.float32 and len(vec) == entries[-1].offset + entries[-1].size
    assert any(e.kind == "buffer" for e in entries)  # BatchNorm running stats are part of P
    other = build_model("resnet18", (1, 32, 32), 10)
    load_flat(other, vec)
    assert torch.equal(flatten(other), vec)


def test_impossible_model_shape_pairs_are_refused():
    with pytest.raises(ConfigError, match="vgg11 needs inputs of at least 32x32"):
        build_model("vgg11", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="needs image inputs"):
        build_model("lenet5", (17,), 2)


# --------------------------------------------------------------------------- any model


def test_torchvision_model_gets_classes_channels_and_the_small_stem():
    torch.manual_seed(0)
    model = build_model("torchvision:resnet34", (1, 16, 16), 7, small_stem=True).eval()
    assert (model.conv1.in_channels, model.conv1.kernel_size, model.conv1.stride) == (
        1,
        (3, 3),
        (1, 1),
    )
    assert isinstance(model.maxpool, torch.nn.Identity)
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 7)
    plain = build_model("torchvision:shufflenet_v2_x0_5", (1, 32, 32), 3)
    first = plain.conv1[0]
    assert (first.in_channels, first.stride) == (1, (2, 2))  # channels adapted, stem kept
    assert isinstance(plain.maxpool, torch.nn.MaxPool2d)


def test_torchvision_refusals_are_one_sentence():
    with pytest.raises(ConfigError, match="not a torchvision classification model"):
        build_model("torchvision:nosuchnet", (3, 32, 32), 10)
    with pytest.raises(ConfigError, match=r"must not set weights.*train\.init"):
        build_model("torchvision:resnet18", (3, 32, 32), 10, model_args={"weights": "DEFAULT"})
    with pytest.raises(ConfigError, match=r"could not be built.*model_args"):
        build_model("torchvision:resnet18", (3, 32, 32), 10, model_args={"depth": 3})


def test_import_path_factory_gets_shape_classes_and_args():
    model = build_model("toy_models:tiny_cnn", (1, 8, 8), 4, model_args={"width": 5})
    assert model[0].out_channels == 5
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no_such_module_xyz:f", "cannot be imported"),
        ("toy_models:missing", "has no 'missing'"),
        ("toy_models:not_a_module", "returned a str, not a torch.nn.Module"),
    ],
)
def test_import_path_failures_are_one_sentence(name, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_model(name, (1, 8, 8), 4)
    assert str(err.value).count(". ") == 0 and "\n" not in str(err.value)


def test_cumulative_batchnorm_is_refused():
    from obliviate.models import require_exact_batchnorm

    require_exact_batchnorm(build_model("toy_models:tiny_cnn", (1, 8, 8), 4))  # momentum 0.1
    with pytest.raises(ConfigError, match=r"momentum=None.*give it a momentum"):
        require_exact_batchnorm(build_model("toy_models:cumulative_batchnorm", (1, 8, 8), 4))


def test_describe_names_the_stem_and_every_module():
    from obliviate.models import describe

    model = build_model("torchvision:resnet18", (1, 32, 32), 10, small_stem=True)
    arch = describe("torchvision:resnet18", model, (1, 32, 32), 10, 128, {}, True)
    assert arch["small_stem"] is True and "stride=1" in arch["stem"]
    assert "Identity()" in arch["modules"] and "get_model('resnet18'" in arch["builder"]


# --------------------------------------------------------------------------- pretrained start


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_init_file_loads_exactly(tmp_path, suffix):
    from safetensors.torch import save_file

    from obliviate.models import load_init

    torch.manual_seed(1)
    source = build_model("toy_models:tiny_cnn", (1, 8, 8), 4)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / f"init{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    torch.manual_seed(2)
    target = build_model("toy_models:tiny_cnn", (1, 8, 8), 4)
    assert not torch.equal(flatten(target), flatten(source))
    load_init(target, path)
    assert torch.equal(flatten(target), flatten(source))


def test_init_file_problems_are_one_sentence(tmp_path):
    from obliviate.models import load_init

    model = build_model("toy_models:tiny_cnn", (1, 8, 8), 4)
    state = model.state_dict()
    cases = {
        "misses keys": {k: v for k, v in state.items() if k != "5.bias"},
        "unexpected keys": {**state, "head.weight": torch.zeros(1)},
        "mis-shaped keys": {**state, "5.bias": torch.zeros(9)},
    }
    for problem, bad in cases.items():
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(ConfigError, match=problem):
            load_init(model, tmp_path / "bad.pt")
    torch.save({"model": model}, tmp_path / "pickled.pt")  # not weights-only: refused
    with pytest.raises(ConfigError, match="cannot be read as a state dict"):
        load_init(model, tmp_path / "pickled.pt")
    with pytest.raises(ConfigError, match="does not exist"):
        load_init(model, tmp_path / "nope.safetensors")


# --------------------------------------------------------------------------- devices


def test_device_auto_is_cpu_without_cuda_and_cuda_is_refused(monkeypatch):
    from obliviate.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=rf"train\.device is {spec}, but torch sees no CUDA"):
            resolve_device(spec)


def test_device_auto_picks_cuda_when_present(monkeypatch):
    from obliviate.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"evaluate\.device is cuda:2, but there are only 2"):
        resolve_device("cuda:2", "evaluate.device")


def test_nondeterministic_op_error_becomes_one_sentence():
    from obliviate.device import determinism_error

    exc = RuntimeError(
        "adaptive_max_pool2d_backward_cuda does not have a deterministic implementation, but "
        "you set 'torch.use_deterministic_algorithms(True)'. ..."
    )
    err = determinism_error(exc)
    assert isinstance(err, ConfigError) and "adaptive_max_pool2d_backward_cuda" in str(err)
    assert determinism_error(RuntimeError("shape mismatch")) is None


def test_import_path_factory_in_the_project_folder(tmp_path):
    (tmp_path / "project_nets_for_test.py").write_text(
        "from torch import nn\n"
        "def build(input_shape, n_classes, hidden=3):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden),\n"
        "                         nn.Linear(hidden, n_classes))\n"
    )
    name = "project_nets_for_test:build"
    with pytest.raises(ConfigError, match="cannot be imported"):
        build_model(name, (1, 8, 8), 4)  # not on the path without the project folder
    model = build_model(name, (1, 8, 8), 4, model_args={"hidden": 5}, root=tmp_path)
    assert model[1].out_features == 5
