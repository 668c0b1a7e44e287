"""One training step: a loader batch onto the device (augmented there), and one optimizer step on it.

``Optimization`` holds what a step works with and a checkpoint keeps (the model, its loss, the
optimizer, its schedule and gradient scaler) and how it runs (autocast precision, gradient
clipping); ``unet.train.fit`` makes one per run and ``benchmarks/train.py`` times ``train_step``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unet.augment import AUGMENTATIONS, apply_augment
from unet.model import UNet


def to_device(
    batch, device: torch.device, channels_last: bool = False, augment: str = "off", fine_labels: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image in the store dtype, uint8 label, augmentation params) from the loader ->
    (float32 image, label) on the device, augmented there (``unet.augment``)."""
    x, y, params = batch
    x, y = x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True)
    if not fine_labels and (f := y.shape[-1] // x.shape[-1]) > 1:
        y = y[..., ::f, ::f].contiguous()  # the slices' grid: the label at each slice pixel's corner
    if AUGMENTATIONS[augment] is not None:
        x, y = apply_augment(x, y, params.to(device, non_blocking=True))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


@dataclass
class Optimization:
    """What a training step works with (and a checkpoint keeps): the model, its loss, the optimizer,
    its schedule and gradient scaler, and the precision and clipping it runs with."""

    model: UNet
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None = None
    grad_clip: float = 0.0


def train_step(opt: Optimization, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on a batch; returns the loss as a device tensor (no host sync)."""
    model = opt.model
    with torch.autocast(x.device.type, dtype=opt.amp or torch.float32, enabled=opt.amp is not None):
        # logits over the whole slice, both padding modes; with deep supervision the auxiliary ones too
        out = model(x, aux=True) if model.cfg.deep_supervision else model.predict(x)
        loss = opt.loss_fn(out, y)
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    if opt.grad_clip:
        opt.scaler.unscale_(opt.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    return loss.detach()
