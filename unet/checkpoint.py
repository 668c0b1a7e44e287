"""Model weights in and out of the registry. Loading never unpickles code: ``weights_only=True``.

A version's ``info.json`` (see ``storage/registry.py``) carries ``model`` (the ``UNetConfig``
fields) and ``profile`` (the store's preprocessing profile), which is all inference needs.
"""

from __future__ import annotations

import io
from dataclasses import asdict

import torch

from storage.registry import Registry
from unet.model import UNet, UNetConfig

WEIGHTS = "weights.pt"


def to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes, device: str | torch.device = "cpu"):
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


def save_model(registry: Registry, version: str, model: UNet) -> str:
    """Write the weights (on CPU) and the model config of a version; returns the weights URL."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    url = registry.put(version, WEIGHTS, to_bytes(state))
    registry.update_info(version, model=asdict(model.cfg))
    return url


def load_model(registry: Registry, version: str | None = None, device: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """The model of a version (default: the best) in eval mode, with the version's info."""
    version = registry.resolve(version)
    info = registry.info(version)
    model = UNet(UNetConfig(**info["model"]))
    model.load_state_dict(from_bytes(registry.get(version, WEIGHTS), device))
    return model.to(device).eval(), info
