"""Models by name, adapted to the data's input shape and class count, and their flat layout.

The paper treats a model as one parameter vector P in a fixed (topological) order. ``layout``
fixes that order: every parameter and floating-point buffer of ``state_dict()``, in registration
order. Integer buffers (BatchNorm's num_batches_tracked) are left out: with a set momentum they
never affect the computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from obliviate.errors import ConfigError


class LeNet5(nn.Module):
    """LeCun et al. (1998) with ReLU and max-pooling; conv2 is padded for inputs under 16 px."""

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int):
        super().__init__()
        c, h, w = in_shape
        pad2 = 2 if min(h, w) < 16 else 0
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (6, h/2, w/2)
            nn.Conv2d(6, 16, 5, padding=pad2),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (16, h', w')
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, c, h, w)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, classes)
        return self.classifier(self.features(x))


def build_model(
    name: str, input_shape: tuple[int, ...], n_classes: int, hidden: int = 128
) -> nn.Module:
    """A fresh model; its initial weights come from torch's global RNG (seed it first)."""
    if name == "mlp":
        n_in = int(torch.tensor(input_shape).prod())
        return nn.Sequential(
            nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
        )
    if len(input_shape) != 3:
        raise ConfigError(
            f"{name} needs image inputs, but the data has shape {input_shape}; "
            "use train.model: mlp."
        )
    if name == "lenet5":
        return LeNet5(input_shape, n_classes)  # type: ignore[arg-type]
    return _torchvision_model(name, input_shape, n_classes)


def _torchvision_model(name: str, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    from torchvision import models

    c, h, w = input_shape
    small = min(h, w) < 64  # CIFAR-sized inputs: no aggressive early downsampling
    if name in ("resnet18", "resnet50"):
        net = getattr(models, name)(weights=None, num_classes=n_classes)
        if small or c != 3:
            stride, kernel = (1, 3) if small else (2, 7)
            net.conv1 = nn.Conv2d(c, 64, kernel, stride, kernel // 2, bias=False)
        if small:
            net.maxpool = nn.Identity()
        return net
    if name == "vgg11":
        if min(h, w) < 32:
            raise ConfigError(
                f"vgg11 needs inputs of at least 32x32, but the data is {h}x{w}; "
                "use train.model: lenet5."
            )
        net = models.vgg11(weights=None, num_classes=n_classes)
        if c != 3:
            net.features[0] = nn.Conv2d(c, 64, 3, padding=1)
        if small:  # 32 px -> 1x1 after five pools; skip the 7x7 upsampling and the 25088-wide FC
            net.avgpool = nn.AdaptiveAvgPool2d(1)
            net.classifier = nn.Sequential(
                nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(), nn.Linear(512, n_classes)
            )
        return net
    raise ConfigError(f"unknown model {name!r}; use lenet5, mlp, resnet18, vgg11 or resnet50.")


# --------------------------------------------------------------------------- flat layout


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int
    size: int
    kind: str  # "param" | "buffer"


def layout(model: nn.Module) -> list[Entry]:
    params = {n for n, _ in model.named_parameters()}
    entries, offset = [], 0
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        entries.append(
            Entry(name, tuple(t.shape), offset, t.numel(), "param" if name in params else "buffer")
        )
        offset += t.numel()
    return entries


def flatten(model: nn.Module) -> torch.Tensor:
    """The model as one float32 vector P (|theta|,) in layout order."""
    state = model.state_dict()
    return torch.cat([state[e.name].detach().reshape(-1).float() for e in layout(model)])


def load_flat(model: nn.Module, vector: torch.Tensor) -> None:
    """Copy a vector from ``flatten`` back into the model, in place and exactly."""
    state = model.state_dict()
    with torch.no_grad():
        for e in layout(model):
            state[e.name].copy_(vector[e.offset : e.offset + e.size].view(e.shape))
