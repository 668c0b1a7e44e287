"""Training loop for the U-Net on slices of the store: resumable, seeded, GPU-ready. No Prefect here.

    data (unet.data) -> augmentation (unet.augment) -> UNet (unet.model) -> loss (unet.loss)
    -> AdamW + one-cycle schedule -> validation (per-case 3D Dice) -> checkpoints

* Device and precision: ``unet.device`` (bf16 autocast on CUDA and on CPUs with native bf16,
  channels_last). The loss is computed on whole slices in both padding modes (``UNet.predict``:
  the paper's overlap-tile for valid padding).
* Resuming: the checkpoint holds model, optimizer, scheduler, scaler, the weights' moving average
  (``average``), RNG, epoch and step; the data order and augmentation depend on (seed, epoch,
  position) only (``unet.data.EpochSampler``), so a run resumed at step s of epoch e sees the very
  batches an uninterrupted run would have seen and ends with the same weights.
* Validation scores every validation case as the test is scored: per-case 3D Dice (WT/TC/ET, the
  BraTS rules for empty masks) over all of its brain slices, averaged over cases; the weights kept
  are the best epoch's, or the last (``keep``); with ``average``, those of the weights' exponential
  moving average (batch-norm statistics included), which is what is validated.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from storage.store import SliceStore
from unet.augment import AUGMENTATIONS
from unet.checkpoint import rng_state, set_rng_state
from unet.config import TrainConfig, run_definition, same_run
from unet.data import EpochSampler, SliceDataset, class_counts, index_slices, make_loader
from unet.device import autocast_dtype, pick_device
from unet.loss import SegLoss, class_weights_from_counts
from unet.model import UNet, UNetConfig
from unet.step import Optimization, moving_average, to_device, train_step
from unet.validate import validate


class Callbacks:
    """Hooks for the caller (progress bars, logs, artifacts). All no-ops here; override some."""

    def on_start(self, total_steps: int, done_steps: int, resumed_from: tuple[int, int] | None) -> None: ...

    def on_step(self, epoch: int, step: int, global_step: int) -> None: ...

    def on_checkpoint(self, epoch: int, step: int) -> None: ...

    def on_epoch(self, row: dict) -> None: ...


@dataclass
class FitResult:
    model: UNet  # weights after the last step (or their moving average, with ``average``), eval mode
    best_state: dict  # CPU state dict of the epoch with the best mean validation Dice
    best: dict  # that epoch's history row
    history: list[dict]  # one row per epoch
    resumed_from: tuple[int, int] | None  # (epoch, step) of the checkpoint this call started from
    device: str


# ----------------------------------------------------------------------------- the loop


@dataclass
class Progress:
    """Where a run is: what a checkpoint holds besides the optimization's state."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=dict)
    best_state: dict = field(default_factory=dict)
    epoch_loss: list = field(default_factory=lambda: [0.0, 0])  # sum of batch losses, batches
    resumed_from: tuple[int, int] | None = None


# what a checkpoint keeps: of the run's Progress, and the state of these parts of its Optimization
PROGRESS = ("epoch", "step", "global_step", "epoch_loss", "history", "best", "best_state")
STATEFUL = ("model", "optimizer", "scheduler", "scaler", "average")  # (average: None where off)


@dataclass
class Data:
    store: SliceStore
    split: dict[str, list[str]]
    train_set: SliceDataset
    sampler: EpochSampler
    loader: torch.utils.data.DataLoader
    steps_per_epoch: int


def fit(
    store_url: str,
    model_cfg: UNetConfig,
    cfg: TrainConfig,
    checkpoint=None,
    callbacks: Callbacks | None = None,
    split: dict[str, list[str]] | None = None,
) -> FitResult:
    """Train on the ``train`` cases, validate on the ``val`` cases, resume from ``checkpoint``.

    ``split``: {"train": [...], "val": [...]} (a cross-validation fold); default: the store's split.
    ``checkpoint``: anything with ``save(state)`` and ``load() -> state | None``
    (``unet.checkpoint.RegistryCheckpoint``), or None to keep nothing.
    """
    callbacks = callbacks or Callbacks()
    device = pick_device(cfg.device)
    channels_last = cfg.channels_last and device.type in ("cuda", "cpu")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    data = load_data(store_url, split, model_cfg, cfg, device)
    opt = optimization(data, model_cfg, cfg, device, channels_last)
    progress = resume(checkpoint, opt, model_cfg, cfg)
    callbacks.on_start(cfg.epochs * data.steps_per_epoch, progress.global_step, progress.resumed_from)
    opt.model.train()
    kept = opt.average.module if opt.average is not None else opt.model  # the weights validated and kept
    try:
        for epoch in range(progress.epoch, cfg.epochs):
            row = train_epoch(opt, data, progress, epoch, cfg, channels_last, checkpoint, callbacks)
            if epoch + 1 == cfg.epochs or (epoch + 1) % cfg.validate_every == 0:
                val = data.split["val"]
                row |= validate(kept, data.store, val, opt.loss_fn, device, opt.amp, channels_last, cfg.batch_size)
            row |= {"lr": opt.scheduler.get_last_lr()[0]}
            progress.history.append(row)
            if "dice_mean" in row and (
                not progress.best or row["dice_mean"] > progress.best["dice_mean"] or cfg.keep == "last"
            ):
                progress.best = row
                progress.best_state = {k: v.detach().to("cpu", copy=True) for k, v in kept.state_dict().items()}
            progress.epoch, progress.step, progress.epoch_loss = epoch + 1, 0, [0.0, 0]
            save(checkpoint, opt, progress, model_cfg, cfg, callbacks)
            callbacks.on_epoch(row)
    finally:
        del data.loader  # stop the worker processes now, also on failure (a retry makes new ones)
    p = progress
    return FitResult(kept.eval(), p.best_state, p.best, p.history, p.resumed_from, str(device))


def load_data(
    store_url: str, split: dict | None, model_cfg: UNetConfig, cfg: TrainConfig, device: torch.device
) -> Data:
    """The training slices (with their sampler and loader) and the validation cases, checked."""
    store = SliceStore(store_url)
    split = split or store.split
    if not split.get("train") or not split.get("val"):
        raise ValueError(f"{store_url}: the store has no train/val split (run `brats ingest`)")
    augment = AUGMENTATIONS[cfg.augment]
    train_set = SliceDataset(
        store_url, split["train"], augment=augment, seed=cfg.seed, skip_empty=cfg.skip_empty, context=model_cfg.context
    )
    index_slices(store, split["val"])  # every validation case must be labelled too
    if not len(train_set):
        raise ValueError(f"{store_url}: no slices to train on")
    per_epoch = cfg.max_steps_per_epoch
    samples = len(train_set) if per_epoch is None else min(len(train_set), per_epoch * cfg.batch_size)
    sampler = EpochSampler([r.tumour > 0 for r in train_set.refs], cfg.seed, cfg.oversample_tumour, samples)
    pin = device.type == "cuda"
    loader = make_loader(train_set, cfg.batch_size, sampler=sampler, workers=cfg.workers, pin_memory=pin)
    return Data(store, split, train_set, sampler, loader, math.ceil(samples / cfg.batch_size))


def optimization(
    data: Data, model_cfg: UNetConfig, cfg: TrainConfig, device: torch.device, channels_last: bool
) -> Optimization:
    """A new model (seeded), its loss (class weights from the training slices), AdamW, the one-cycle
    schedule over the whole run, and the gradient scaler fp16 needs."""
    layout = torch.channels_last if channels_last else torch.preserve_format
    model = UNet(model_cfg).to(device, memory_format=layout)
    weighted = cfg.class_weight_power is not None and model_cfg.outputs == "classes"
    counts = class_counts(data.store, data.train_set.refs) if weighted else None
    weights = None if counts is None else class_weights_from_counts(counts, cfg.class_weight_power)
    loss_fn = SegLoss(weights, dice=cfg.loss == "ce+dice", outputs=model_cfg.outputs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(cfg.epochs * data.steps_per_epoch, 1)
    # OneCycleLR divides by (warm-up steps - 1): a short run warms up over 2 steps at least, a tiny one not at all
    warmup = max(cfg.warmup, 2 / total) if cfg.warmup and total > 4 else 0.0
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total, pct_start=warmup, cycle_momentum=False
    )
    amp = autocast_dtype(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    average = moving_average(model, cfg.average) if cfg.average else None
    return Optimization(model, loss_fn, optimizer, scheduler, scaler, amp, cfg.grad_clip, average)


def resume(checkpoint, opt: Optimization, model_cfg: UNetConfig, cfg: TrainConfig) -> Progress:
    """Where the run stands: the checkpoint's state loaded into ``opt``, or the start."""
    state = checkpoint.load() if checkpoint is not None else None
    if state is None:
        return Progress()
    if not same_run(model_cfg, cfg, state["model_config"], state["plan"]):
        raise ValueError("the checkpoint belongs to another model or training config; start afresh")
    for k in STATEFUL:
        if getattr(opt, k) is not None:
            getattr(opt, k).load_state_dict(state[k])
    set_rng_state(state["rng"])
    return Progress(**{k: state[k] for k in PROGRESS}, resumed_from=(state["epoch"], state["step"]))


def save(checkpoint, opt: Optimization, progress: Progress, model_cfg: UNetConfig, cfg: TrainConfig, callbacks) -> None:
    """Checkpoint the run where ``progress`` says it stands (nothing without a checkpoint)."""
    if checkpoint is None:
        return
    state = {k: getattr(progress, k) for k in PROGRESS} | {"rng": rng_state(), "plan": run_definition(cfg)}
    state |= {k: getattr(opt, k).state_dict() for k in STATEFUL if getattr(opt, k) is not None}
    checkpoint.save(state | {"model_config": model_cfg.model_dump()})
    callbacks.on_checkpoint(progress.epoch, progress.step)


def train_epoch(
    opt: Optimization,
    data: Data,
    progress: Progress,
    epoch: int,
    cfg: TrainConfig,
    channels_last: bool,
    checkpoint,
    callbacks: Callbacks,
) -> dict:
    """One epoch (from where a resumed run stopped in it), checkpointing every ``checkpoint_every``
    steps; its history row: epoch, steps, mean train loss, slices/s."""
    first = progress.step if epoch == progress.epoch else 0
    data.sampler.set_epoch(epoch, start=first * cfg.batch_size)
    device = next(opt.model.parameters()).device
    loss_sum = torch.tensor(progress.epoch_loss[0], device=device)
    started, n_slices = time.perf_counter(), 0
    for step, batch in enumerate(data.loader, start=first):
        x, y = to_device(batch, device, channels_last, cfg.augment, cfg.fine_labels, cfg.patch)
        loss_sum += train_step(opt, x, y)
        progress.epoch_loss[1] += 1
        progress.global_step += 1
        n_slices += len(x)
        callbacks.on_step(epoch, step + 1, progress.global_step)
        if (
            cfg.checkpoint_every
            and progress.global_step % cfg.checkpoint_every == 0
            and step + 1 < data.steps_per_epoch
        ):
            progress.epoch_loss[0] = loss_sum.item()
            progress.epoch, progress.step = epoch, step + 1
            save(checkpoint, opt, progress, opt.model.cfg, cfg, callbacks)
    seconds = time.perf_counter() - started
    return {
        "epoch": epoch + 1,
        "steps": progress.global_step,
        "train_loss": loss_sum.item() / max(progress.epoch_loss[1], 1),
        "slices_per_s": n_slices / seconds if seconds > 0 else 0.0,
    }
