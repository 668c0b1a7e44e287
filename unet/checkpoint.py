"""Model weights in and out of the registry. Loading never unpickles code: ``weights_only=True``.

A version's info (``storage.versions.VersionInfo``) carries ``model`` (the ``UNetConfig`` fields)
and ``profile`` (the store's preprocessing profile), which is all inference needs; an
ensemble version names its ``members`` (versions of their own) instead of holding weights.
A training run also keeps its full state (``checkpoint.pt``) there, to resume after a kill.
``cached_model`` loads a version once per process, for every thread that predicts with it.
"""

from __future__ import annotations

import io
import random
import threading
from functools import lru_cache

import numpy as np
import torch

from storage.registry import Registry
from storage.versions import ModelVersion, VersionInfo
from unet.ensemble import Ensemble
from unet.model import UNet, UNetConfig

WEIGHTS = "weights.pt"


def to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes, device: str | torch.device = "cpu"):
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


def save_model(registry: Registry, version: str, model: UNet) -> str:
    """Write the weights (on CPU) and the network's config of a version; returns the weights URL."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    url = registry.put(version, WEIGHTS, to_bytes(state))
    ModelVersion(registry, version).record_model(model.cfg.model_dump())
    return url


def load_model(
    registry: Registry, version: str | None = None, device: str | torch.device = "cpu"
) -> tuple[UNet | Ensemble, VersionInfo]:
    """The model of a version (None: the best) in eval mode, with the version's info. An ensemble version
    (``members`` in its info: the models of a cross-validation) loads as one ``Ensemble``."""
    info = ModelVersion.resolve(registry, version).info
    if info.members:
        return Ensemble([load_model(registry, m, device)[0] for m in info.members]).to(device).eval(), info
    model = UNet(UNetConfig(**info.model))
    model.load_state_dict(from_bytes(registry.get(info.version, WEIGHTS), device))
    return model.to(device).eval(), info


# ----------------------------------------------------------------------------- the model cache

_loading = threading.Lock()


def cached_model(registry_url: str, version: str, device: str) -> tuple[UNet, VersionInfo]:
    """``load_model`` once per process for (registry root, version, device); the model is shared
    read-only by every thread that predicts with it. Pass a resolved version, not "best"."""
    with _loading:  # two threads asking at once load it once
        return _load(registry_url, version, device)


@lru_cache(maxsize=4)
def _load(registry_url: str, version: str, device: str) -> tuple[UNet, VersionInfo]:
    return load_model(Registry(registry_url), version, device)


# ----------------------------------------------------------------------------- training state

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict:
    """Every global RNG a training step may touch, as tensors and plain Python (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class RegistryCheckpoint:
    """The training checkpoint of one registry version (``checkpoint.pt``), written atomically.

    The state is a dict of tensors and plain Python (model, optimizer, scheduler, scaler, epoch,
    step, RNG, history, ...; see ``unet.train.fit``), so loading needs no pickled code.
    """

    def __init__(self, registry: Registry, version: str, name: str = CHECKPOINT):
        self.registry, self.version, self.name = registry, version, name

    def save(self, state: dict) -> str:
        return self.registry.put(self.version, self.name, to_bytes(state))

    def load(self, device: str | torch.device = "cpu") -> dict | None:
        """The last saved state, or None when this version has none yet."""
        if not self.registry.exists(self.version, self.name):
            return None
        return from_bytes(self.registry.get(self.version, self.name), device)
