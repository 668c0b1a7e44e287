"""Recipes: named sets of the data, network and training sections, each the best this project knows
for one kind of machine. A run names one (``--recipe cpu``) and may still set any field over it.

* ``paper``: the 2015 U-Net as published: unpadded (valid) 3x3 convolutions, no normalisation,
  base 64, dropout at the end of the contracting path (0.5, as its Caffe model), the pixel-wise
  cross-entropy, on whole 240x240 slices; one model on the store's split.
* ``cpu``: the best that trains in 45 minutes on 2 CPU cores for ~20 cases, ingestion and a 5-fold
  cross-validation included; its model is the ensemble of the 5 fold models, which take turns at
  nnU-Net's augmentation and GIN's (``member_augment``): the two err unlike each other (GIN draws
  more edema), and a pair of one of each outscores a pair of two seeds (``benchmarks/members.py``).
* ``gpu``: the best in 30 minutes on one H100-class GPU: the paper's width on whole slices, 5 folds.

The figures behind the choices are in the README ("What to expect") and come from
``benchmarks/real.py`` (cross-validation and ablation on real cases).
"""

from __future__ import annotations

from pydantic import BaseModel

from unet.config import TrainConfig
from unet.model import UNetConfig
from unet.preprocess import Preprocessing


class Recipe(BaseModel):
    data: Preprocessing
    network: UNetConfig
    training: TrainConfig


def _strong_2d(profile: str, base_channels: int, **training) -> Recipe:
    """What makes a 2D U-Net strong on BraTS (the ablation of benchmarks/real.py), as a 5-fold
    cross-validated ensemble on all labelled cases; ``training``: what the machine decides."""
    return Recipe(
        data=Preprocessing(profile=profile, split_ratios=(1.0, 0.0, 0.0)),
        network=UNetConfig(
            base_channels=base_channels, depth=4, padding="same", norm="batch", context=1, deep_supervision=True
        ),
        training=TrainConfig(
            oversample_tumour=3.0,
            class_weight_power=0.5,
            loss="ce+dice",
            augment="strong",
            member_augment=("strong", "gin"),  # members take turns: unlike errors, a better mean
            keep="last",
            folds=5,
            max_steps_per_epoch=250,
            **training,
        ),
    )


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        data=Preprocessing(profile="full"),
        network=UNetConfig(base_channels=64, depth=4, padding="valid", norm=None, dropout=0.5),
        training=TrainConfig(epochs=20, batch_size=4, lr=1e-4, loss="ce", augment="light"),
    ),
    "cpu": _strong_2d("tp-clip", 16, epochs=12, batch_size=8, lr=3e-3, validate_every=4, workers=1, device="cpu"),
    "gpu": _strong_2d("full", 64, epochs=30, batch_size=32, lr=1e-3, validate_every=5, workers=8, device="cuda"),
}


def recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"no recipe {name!r}; choose one of {', '.join(RECIPES)}") from None
