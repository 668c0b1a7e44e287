"""A training run's options (``TrainConfig``): optimizer, schedule, sampling, augmentation, the
cross-validation, where it runs. ``unet.train.fit`` runs one; a model version records it.

``run_definition``: the fields that decide what a run computes (not how fast); ``same_run``: whether
a run a checkpoint or a model version recorded is this one (to be resumed, or a fold version reused).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from unet.augment import AUGMENTATIONS
from unet.device import DEVICE_HELP
from unet.model import UNetConfig

Augment = Literal[tuple(AUGMENTATIONS)]  # the names of unet/augment.py's sets, in its order: one list of them


class TrainConfig(BaseModel):
    """The training run: optimizer, schedule, sampling, augmentation, where it runs."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    epochs: int = Field(20, ge=1, description="passes over the training slices (or over max_steps_per_epoch batches)")
    batch_size: int = Field(16, ge=1, description="slices per step")
    lr: float = Field(
        1e-3, gt=0, description="peak AdamW learning rate of the one-cycle schedule (warm-up, cosine decay)"
    )
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of all steps spent warming up")
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 = off")
    seed: int = Field(0, description="seeds the weights, the data order and the augmentation")
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="cap an epoch at this many steps (short runs); empty: every slice once"
    )
    oversample_tumour: float = Field(1.0, ge=1, description="draw slices with tumour this many times as often (1 = no)")
    skip_empty: bool = Field(True, description="leave out slices without brain")
    augment: Augment = Field(
        "light",
        description="light: flips, small rotations, intensity jitter; strong: nnU-Net's 2D set (rotation, scaling, "
        "noise, blur, brightness, contrast, low resolution, gamma); scanner: strong, per-modality bias fields, wider "
        "intensity changes; gin: strong and random shallow conv networks per modality (unseen contrasts, textures); "
        "drop: strong and one modality blanked in a quarter of the samples (modality dropout)",
    )
    member_augment: tuple[Augment, ...] = Field(
        (),
        description="cross-validation: fold i's model trains with the i-th of these in turn (e.g. strong gin), "
        "so the ensemble's members differ in what they were shown; empty: every member uses augment",
    )
    loss: Literal["ce", "ce+dice"] = Field(
        "ce", description="ce: the paper's cross-entropy; ce+dice: plus the soft Dice of the regions WT, TC, ET"
    )
    class_weight_power: float | None = Field(
        None, ge=0, description="weight classes by (1/frequency)**power; empty: plain cross-entropy"
    )
    patch: int | None = Field(
        None,
        ge=16,
        multiple_of=16,
        description="train on patch×patch crops of the slices (unet.step.crop), "
        "predict on whole slices: 96 with profile window (1 mm) costs what tp costs; empty: whole slices",
    )
    fine_labels: bool = Field(
        True,
        description="score the loss on the labels' own grid where the store keeps them finer than the slices "
        "(profile tp: 1 mm labels, 2 mm slices); off: every 2nd label pixel, on the slices' grid",
    )
    folds: int = Field(
        0,
        ge=0,
        description="K-fold cross-validation: K models by patient folds, registered as their ensemble; "
        "0: one model on the store's split",
    )
    fold_by: Literal["patient", "site"] = Field(
        "patient",
        description="how cases are cut into folds: by patient (stratified by grade), or by site "
        "(leave-one-institution-out: each institution of the BraTS ids whole in one fold, small ones pooled)",
    )
    keep: Literal["best", "last"] = Field(
        "best", description="the weights kept: the epoch with the best validation Dice, or the last epoch"
    )
    average: float = Field(
        0.0, ge=0, lt=1, description="keep a moving average of the weights and norm statistics, this decay (0: off)"
    )
    validate_every: int = Field(1, ge=1, description="validate every N epochs (and after the last)")
    checkpoint_every: int = Field(200, ge=0, description="also checkpoint every N steps (0 = at epoch ends only)")
    workers: int = Field(4, ge=0, description="DataLoader worker processes")
    device: str = Field("auto", description=DEVICE_HELP)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="auto: bf16 autocast on CUDA (fp16 + scaler without bf16) and on CPUs with native bf16, else fp32",
    )
    channels_last: bool = Field(True, description="NHWC tensors: faster convolutions on CUDA and on CPUs (oneDNN)")

    @field_validator("folds")
    @classmethod
    def _two_folds_at_least(cls, value: int) -> int:
        if value == 1:
            raise ValueError("cross-validation needs 2 folds or more (0: no cross-validation)")
        return value

    def member(self, fold: int) -> TrainConfig:
        """The training of fold ``fold``'s model: its own augmentation where the members take turns."""
        turns = self.member_augment
        return self.model_copy(update={"augment": turns[fold % len(turns)]}) if turns else self

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_as_a_flag(cls, value):  # versions and deployments from before the named sets
        return {True: "light", False: "off"}.get(value, value) if isinstance(value, bool) else value


# fields that change how fast a run goes, not what it computes: a run may resume under other values
RUNTIME_FIELDS = {"checkpoint_every", "workers", "device", "precision", "channels_last"}


def run_definition(cfg: TrainConfig) -> dict:
    """The fields that define a run's result (what a checkpoint must agree with to be resumed)."""
    return cfg.model_dump(exclude=RUNTIME_FIELDS)


def same_run(network: UNetConfig, cfg: TrainConfig, recorded_network: dict, recorded_training: dict) -> bool:
    """Whether a run as a checkpoint or a model version recorded it (its network's and its training's
    fields) is this one: the same network, the same ``run_definition``. A record from before a field
    was added reads as that field's default."""
    then = TrainConfig.model_validate(recorded_training)
    return UNetConfig.model_validate(recorded_network) == network and run_definition(then) == run_definition(cfg)
