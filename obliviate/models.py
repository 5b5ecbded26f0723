"""Models by name, adapted to the data's input shape and class count, and their flat layout.

The paper treats a model as one parameter vector P in a fixed (topological) order. ``layout``
fixes that order: every parameter and floating-point buffer of ``state_dict()``, in registration
order. Integer buffers (BatchNorm's num_batches_tracked) are left out: with a set momentum they
never affect the computation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

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


PRESETS = ("lenet5", "mlp", "resnet18", "vgg11", "resnet50")
TORCHVISION = "torchvision:"


def model_kind(name: str) -> str:
    """preset | torchvision | import (``pkg.module:factory``), from the name alone."""
    if name in PRESETS:
        return "preset"
    return "torchvision" if name.startswith(TORCHVISION) else "import"


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    n_classes: int,
    hidden: int = 128,
    model_args: dict | None = None,
    small_stem: bool = False,
    root: Path | None = None,
) -> nn.Module:
    """A fresh model; its initial weights come from torch's global RNG (seed it first).

    ``name`` is a preset, ``torchvision:<name>`` (any torchvision classification model, built
    with ``num_classes`` and ``model_args``; ``small_stem`` makes its first conv 3x3 stride 1 and
    drops its max-pool) or ``pkg.module:factory``, called as
    ``factory(input_shape, n_classes, **model_args)``, importable from ``root`` (the project
    folder) as well as from the installed packages.
    """
    kind = model_kind(name)
    if kind == "torchvision":
        return _any_torchvision(name[len(TORCHVISION) :], input_shape, n_classes,
                                model_args or {}, small_stem)  # fmt: skip
    if kind == "import":
        return _imported(name, input_shape, n_classes, model_args or {}, root)
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


def describe(
    name: str,
    model: nn.Module,
    input_shape: tuple[int, ...],
    n_classes: int,
    hidden: int,
    model_args: dict,
    small_stem: bool,
) -> dict:
    """The architecture, named fully enough to rebuild it without obliviate (store attrs and the
    export sidecar): how to construct it, the stem, and torch's printout of every module."""
    kind = model_kind(name)
    arch = {"model": name, "kind": kind, "input_shape": list(input_shape),
            "n_classes": n_classes, "model_args": dict(model_args)}  # fmt: skip
    if kind == "torchvision":
        arch["builder"] = (
            f"torchvision.models.get_model({name[len(TORCHVISION) :]!r}, weights=None, "
            f"num_classes={n_classes}, **model_args)"
        )
        arch["small_stem"] = small_stem
        arch["in_channels"] = input_shape[0] if len(input_shape) == 3 else None
        arch["stem"] = (
            "first Conv2d replaced by Conv2d(in_channels, out, 3, stride=1, padding=1), "
            "attribute maxpool (if any) replaced by Identity"
            if small_stem
            else "torchvision's stem; first Conv2d rebuilt for in_channels when it is not 3"
        )
    elif kind == "import":
        arch["builder"] = f"{name.replace(':', '.')}(input_shape, n_classes, **model_args)"
        arch["source_sha256"] = _source_digest(name)  # the user's code: an edit is a new model
    else:
        arch["builder"] = f"obliviate preset {name}"
        arch["hidden"] = hidden if name == "mlp" else None
        if name in ("resnet18", "resnet50") and len(input_shape) == 3:
            c, h, w = input_shape
            small = min(h, w) < 64
            arch["stem"] = (
                f"conv1 = Conv2d({c}, 64, 3, stride=1, padding=1, bias=False); maxpool = Identity"
                if small
                else f"conv1 = Conv2d({c}, 64, 7, stride=2, padding=3, bias=False); max-pool kept"
            )
    arch["modules"] = repr(model)
    return arch


def _source_digest(path: str) -> str | None:
    """sha256 of the file that defines an import-path model's factory (None if it has none)."""
    import importlib
    import inspect

    module = importlib.import_module(path.partition(":")[0])  # imported by the build already
    try:
        return hashlib.sha256(Path(inspect.getfile(module)).read_bytes()).hexdigest()
    except (TypeError, OSError):
        return None


def _imported(
    path: str, input_shape: tuple[int, ...], n_classes: int, args: dict, root: Path | None
) -> nn.Module:
    """``pkg.module:factory`` -> factory(input_shape, n_classes, **args), an nn.Module."""
    import importlib
    import sys

    if root is not None and str(root) not in sys.path:
        sys.path.append(str(root))  # after the installed packages: a project file never shadows
    module_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise ConfigError(
            f"train.model {path!r}: module {module_name!r} cannot be imported ({exc}); "
            "install it or put it in the project folder."
        ) from None
    except AttributeError:
        raise ConfigError(
            f"train.model {path!r}: module {module_name!r} has no {attr!r}; fix the name."
        ) from None
    try:
        model = factory(tuple(input_shape), n_classes, **args)
    except Exception as exc:
        raise ConfigError(
            f"train.model {path!r} failed: {type(exc).__name__}: {exc}; fix the factory or "
            "train.model_args."
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"train.model {path!r} returned a {type(model).__name__}, not a torch.nn.Module; "
            "make the factory return the model."
        )
    return model


def _any_torchvision(
    name: str, input_shape: tuple[int, ...], n_classes: int, args: dict, small_stem: bool
) -> nn.Module:
    """Any torchvision classification model, untrained, adapted to the input channels."""
    from torchvision import models

    if name not in models.list_models(module=models):
        raise ConfigError(
            f"train.model 'torchvision:{name}' is not a torchvision classification model; "
            "pick one of torchvision.models.list_models(module=torchvision.models)."
        )
    if "weights" in args or "num_classes" in args:
        raise ConfigError(
            "train.model_args must not set weights or num_classes (obliviate sets them); "
            "start from pretrained weights with train.init: <file>."
        )
    if len(input_shape) != 3:
        raise ConfigError(
            f"torchvision:{name} needs image inputs, but the data has shape {input_shape}; "
            "use train.model: mlp."
        )
    try:
        net = models.get_model(name, weights=None, num_classes=n_classes, **args)
    except Exception as exc:
        raise ConfigError(
            f"torchvision:{name} could not be built: {type(exc).__name__}: {exc}; "
            "fix train.model_args."
        ) from None
    parent, attr, conv = _first_conv(net)
    c = input_shape[0]
    if conv is None:
        raise ConfigError(f"torchvision:{name} has no Conv2d stem; use another model.")
    if small_stem or c != conv.in_channels:
        kernel, stride, padding = (3, 1, 1) if small_stem else (
            conv.kernel_size, conv.stride, conv.padding)  # fmt: skip
        new = nn.Conv2d(c, conv.out_channels, kernel, stride, padding,
                        groups=1, bias=conv.bias is not None)  # fmt: skip
        setattr(parent, attr, new)
    if small_stem and isinstance(getattr(net, "maxpool", None), nn.MaxPool2d):
        net.maxpool = nn.Identity()
    return net


def _first_conv(net: nn.Module) -> tuple[nn.Module, str, nn.Conv2d | None]:
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return net.get_submodule(parent_name), attr, m
    return net, "", None


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


def require_exact_batchnorm(model: nn.Module) -> None:
    """BatchNorm replays exactly when its running statistics are float buffers (they are part of
    every stored P_k); with momentum=None it averages over num_batches_tracked, an integer
    counter the flat layout does not keep, so a replay would differ: refuse it."""
    for name, m in model.named_modules():
        batchnorm = isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        if batchnorm and m.momentum is None:
            raise ConfigError(
                f"the model's BatchNorm {name!r} has momentum=None (a cumulative average over "
                "an integer batch counter the store does not keep), so replay could not be "
                "exact; give it a momentum (e.g. 0.1)."
            )


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
    """The model as one float32 vector P (|theta|,) in layout order, on the CPU."""
    state = model.state_dict()
    return torch.cat([state[e.name].detach().reshape(-1).float() for e in layout(model)]).cpu()


def load_flat(model: nn.Module, vector: torch.Tensor) -> None:
    """Copy a vector from ``flatten`` back into the model, in place and exactly."""
    state = model.state_dict()
    entries = layout(model)
    if entries:  # one copy to the model's device, then views of it
        vector = torch.as_tensor(vector).to(state[entries[0].name].device)
    with torch.no_grad():
        for e in entries:
            state[e.name].copy_(vector[e.offset : e.offset + e.size].view(e.shape))


# --------------------------------------------------------------------------- pretrained start


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``.pt`` file (loaded with weights_only=True)."""
    if not path.is_file():
        raise ConfigError(f"train.init {path} does not exist; fix the path or set it to null.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"train.init {path} cannot be read as a state dict ({type(exc).__name__}); give a "
            ".safetensors file or a .pt file saved with torch.save(model.state_dict(), path)."
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConfigError(
            f"train.init {path} holds a {type(state).__name__}, not a state dict of tensors; "
            "save it with torch.save(model.state_dict(), path)."
        )
    return state


def load_init(model: nn.Module, path: Path) -> None:
    """Load a pretrained state dict into ``model`` (it becomes P_0). Every float tensor of the
    model must be in the file with its shape; integer buffers (BatchNorm's batch counter) may be
    left out; any other key is an error."""
    state = read_state_dict(path)
    own = model.state_dict()
    required = {e.name for e in layout(model)}
    missing = sorted(required - state.keys())
    extra = sorted(state.keys() - own.keys())
    shaped = sorted(k for k in state.keys() & own.keys() if state[k].shape != own[k].shape)
    for problem, keys in (("misses", missing), ("has unexpected", extra),
                          ("has mis-shaped", shaped)):  # fmt: skip
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            raise ConfigError(
                f"train.init {path} {problem} keys for this model ({len(keys)}: {shown}); "
                "give a state dict saved from the same architecture (train.model, model_args, "
                "small_stem)."
            )
    with torch.no_grad():
        for name, t in state.items():
            own[name].copy_(t)
