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
