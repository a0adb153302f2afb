"""Device, mixed-precision and random-state helpers shared by training, evaluation and export."""

from __future__ import annotations

import random

import numpy as np
import torch


class DeviceError(ValueError):
    """A device or precision that this machine cannot provide; the message names the option."""


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """`auto` = CUDA where there is one, else CPU; plain `cuda` means this process's local rank."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but CUDA is not available")
        if device == "cuda":
            device = f"cuda:{local_rank}"
    return torch.device(device)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: auto = bf16 where the GPU supports it, else fp16, and off on CPU."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise DeviceError("--amp fp16 needs CUDA; use --amp bf16 or --amp off on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states, for an exact resume.

    Plain lists, ints and tensors only, so that `torch.load(weights_only=True)` reads them back (no pickled
    numpy objects in a checkpoint).
    """
    version, python_keys, gauss = random.getstate()
    name, numpy_keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(python_keys), gauss],
             "numpy": [name, numpy_keys.tolist(), position, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, python_keys, gauss = state["python"]
    random.setstate((version, tuple(python_keys), gauss))
    name, numpy_keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(numpy_keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
