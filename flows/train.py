"""Flow ``train``: slices in the store -> a trained U-Net as a new version in the model registry.

    open (or reopen) a model version -> train_model (tag gpu; retries resume from its checkpoint)
    -> choose its post-processing on the validation cases (original grids, as the test is scored)
    -> promote the version to BEST when its validation Dice beats the current best

A flow run that was killed and is started again with the same store and the same parameters
continues the unfinished version from its last checkpoint (``--fresh`` starts a new one).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from flows.report import report
from storage.registry import DEFAULT_ROOT
from tasks.evaluate import choose_postprocess
from tasks.train import open_version, promote_if_best, train_model
from unet.device import pick_device
from unet.model import UNetConfig
from unet.train import TrainConfig

T, M = TrainConfig, UNetConfig  # defaults come from the dataclasses


class TrainParams(BaseModel):
    """Parameters of a training run (rendered as a form in the Prefect UI)."""

    store: str = Field(description="Slice store (local path or fsspec URL) with a train/val split")
    models: str = Field(DEFAULT_ROOT, description="Model registry root (env BRATS_MODELS)")
    fresh: bool = Field(False, description="start a new version even if an unfinished one of the same run exists")
    # the network (unet.model.UNetConfig)
    base_channels: int = Field(M.base_channels, ge=1, description="channels of the first level (paper: 64)")
    depth: int = Field(M.depth, ge=1, description="number of 2x2 max-pools (paper: 4)")
    padding: Literal["valid", "same"] = Field(M.padding, description="valid: the paper's unpadded convs; same: zero-padded")
    norm: Literal["batch", "instance"] | None = Field(M.norm, description="normalisation after each conv (paper: none)")
    # the training (unet.train.TrainConfig)
    epochs: int = Field(T.epochs, ge=1)
    batch_size: int = Field(T.batch_size, ge=1)
    lr: float = Field(T.lr, gt=0, description="peak AdamW learning rate (one-cycle schedule)")
    weight_decay: float = Field(T.weight_decay, ge=0)
    warmup: float = Field(T.warmup, ge=0, lt=1, description="fraction of steps spent warming up")
    grad_clip: float = Field(T.grad_clip, ge=0, description="max gradient norm, 0 = off")
    seed: int = T.seed
    max_steps_per_epoch: int | None = Field(T.max_steps_per_epoch, ge=1, description="cap an epoch (short runs)")
    oversample_tumour: float = Field(T.oversample_tumour, ge=1, description="draw tumour slices this many times as often")
    skip_empty: bool = Field(T.skip_empty, description="leave out slices without brain")
    augment: bool = Field(T.augment, description="flips, small rotations, intensity jitter")
    class_weight_power: float | None = Field(T.class_weight_power, ge=0, description="class weights (1/frequency)**power; None = plain CE")
    checkpoint_every: int = Field(T.checkpoint_every, ge=0, description="also checkpoint every N steps (0 = epoch ends only)")
    workers: int = Field(T.workers, ge=0, description="DataLoader worker processes")
    device: str = Field(T.device, description="auto (cuda, mps, cpu) or a torch device")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = T.precision
    channels_last: bool = T.channels_last

    def unet_config(self) -> UNetConfig:
        return UNetConfig(**{f.name: getattr(self, f.name) for f in fields(UNetConfig) if hasattr(self, f.name)})

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})


@flow(name="train", log_prints=True)
def train(params: TrainParams) -> dict:
    log = get_run_logger()
    device = pick_device(params.device)  # a device that is not there fails here, at once, not after retries
    model_cfg, train_cfg = asdict(params.unet_config()), asdict(params.train_config())
    version, reopened = open_version(params.models, params.store, model_cfg, train_cfg, params.fresh)
    log.info("%s version %s in %s", "continuing unfinished" if reopened else "new", version, params.models)
    summary = train_model(params.store, params.models, version, model_cfg, train_cfg)
    summary["postprocess"] = choose_postprocess(params.store, params.models, version, str(device))
    best = promote_if_best(params.models, version)
    log.info("%s: validation Dice %s%s", version, summary["metrics"], " — now BEST" if best else "")
    return {**summary, "best": best}


def add_command(sub) -> None:
    p = sub.add_parser("train", help="train the U-Net on a slice store; registers a model version")
    p.add_argument("--store", required=True, help="slice store path or fsspec URL")
    p.add_argument("--models", default=DEFAULT_ROOT, help=f"model registry root (default {DEFAULT_ROOT})")
    p.add_argument("--fresh", action="store_true", help="do not continue an unfinished version of the same run")
    p.add_argument("--base-channels", type=int, default=M.base_channels)
    p.add_argument("--depth", type=int, default=M.depth)
    p.add_argument("--padding", choices=["valid", "same"], default=M.padding)
    p.add_argument("--norm", choices=["batch", "instance"], default=M.norm)
    p.add_argument("--epochs", type=int, default=T.epochs)
    p.add_argument("--batch-size", type=int, default=T.batch_size)
    p.add_argument("--lr", type=float, default=T.lr)
    p.add_argument("--weight-decay", type=float, default=T.weight_decay)
    p.add_argument("--seed", type=int, default=T.seed)
    p.add_argument("--max-steps-per-epoch", type=int, default=T.max_steps_per_epoch)
    p.add_argument("--oversample-tumour", type=float, default=T.oversample_tumour)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--class-weight-power", type=float, default=T.class_weight_power, help="e.g. 0.5; default: plain cross-entropy")
    p.add_argument("--checkpoint-every", type=int, default=T.checkpoint_every, help="steps; 0 = epoch ends only")
    p.add_argument("--workers", type=int, default=T.workers)
    p.add_argument("--device", default=T.device)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=T.precision)
    p.set_defaults(run=run_cli)


def run_cli(args) -> int:
    names = set(TrainParams.model_fields)
    params = TrainParams(**{k: v for k, v in vars(args).items() if k in names})
    state = train(params, return_state=True)
    return report(state)
