"""Where training and prediction run, and the settings that keep replay bit-exact there.

Replay is exact on the same *device class* only (CPU kernels and each GPU model round
differently), with deterministic kernels and a fixed thread count. ``device_record`` is what the
store keeps of the class that built it; ``obliviate.compat`` compares it with the one at hand.
"""

from __future__ import annotations

import os

import torch

from obliviate.errors import ConfigError


def configure_determinism(threads: int) -> None:
    """Deterministic kernels and a fixed thread count: part of the replay contract.

    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when CUDA first uses it, so this runs before any model
    touches a GPU; a value the user set stays."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.set_num_threads(threads)


def resolve_device(spec: str, key: str = "train.device") -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch.device; auto picks CUDA when it is present."""
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda", 0) if available else torch.device("cpu")
    if not available:
        raise ConfigError(
            f"{key} is {spec}, but torch sees no CUDA device here; set {key}: auto or cpu."
        )
    index = int(spec.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"{key} is {spec}, but there are only {torch.cuda.device_count()} CUDA device(s); "
            f"set {key}: cuda:0 .. cuda:{torch.cuda.device_count() - 1} or auto."
        )
    return torch.device("cuda", index)


def device_record(device: torch.device, threads: int) -> dict:
    """What replay exactness depends on besides the params: kept in the store's attrs."""
    cuda = device.type == "cuda"
    return {
        "class": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "threads": threads,
    }


def determinism_error(exc: RuntimeError) -> ConfigError | None:
    """torch's error for an op without a deterministic kernel, as one sentence."""
    msg = str(exc)
    if "does not have a deterministic implementation" not in msg:
        return None
    op = msg.split(" does not have", 1)[0].strip().split()[-1]
    return ConfigError(
        f"the model uses {op}, which has no deterministic kernel on this device, so replay "
        "could not be exact; choose a model without it or set train.device: cpu."
    )
