"""One training step: a loader batch onto the device (augmented there), and one optimizer step on it.

``Optimization`` holds what a step works with and a checkpoint keeps (the model, its loss, the
optimizer, its schedule and gradient scaler, the weights' moving average where there is one) and how
it runs (autocast precision, gradient clipping); ``unet.train.fit`` makes one per run and
``benchmarks/train.py`` times ``train_step``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from unet.augment import AUGMENTATIONS, apply_augment
from unet.model import UNet

TUMOUR_CENTRED = 2 / 3  # share of the patches of a slice with tumour that are centred on a tumour pixel


def to_device(
    batch,
    device: torch.device,
    channels_last: bool = False,
    augment: str = "off",
    fine_labels: bool = True,
    patch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image in the store dtype, uint8 label, augmentation params) from the loader ->
    (float32 image, label) on the device, cut to ``patch`` x ``patch`` pixels (``crop``) when
    given, and augmented there (``unet.augment``)."""
    x, y, params = batch
    x, y = x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True)
    if not fine_labels and (f := y.shape[-1] // x.shape[-1]) > 1:
        y = y[..., ::f, ::f].contiguous()  # the slices' grid: the label at each slice pixel's corner
    if patch:  # before augmenting: the augmentation costs what the patch's pixels cost
        x, y = crop(x, y, params, patch)
    if AUGMENTATIONS[augment] is not None:
        x, y = apply_augment(x, y, params.to(device, non_blocking=True))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def crop(x: torch.Tensor, y: torch.Tensor, params: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``size`` x ``size`` patch of each slice of a batch (N, C, H, W) and of its labels
    (N, H', W', H' a multiple of H): centred on a random tumour pixel for ``TUMOUR_CENTRED`` of the
    slices that have tumour, anywhere on the slice otherwise (clamped inside it). Drawn from each
    sample's augmentation seed (``params[:, 4]``), so a resumed run cuts the same patches; a slice
    no larger than ``size`` is left whole."""
    h, w = x.shape[-2:]
    if size >= min(h, w):
        return x, y
    f = y.shape[-1] // w
    seeds = params[:, 4].to("cpu", torch.int64).tolist()
    xs, ys = [], []
    for i, seed in enumerate(seeds):
        u = torch.rand(3, generator=torch.Generator().manual_seed(seed + 1)).tolist()
        tumour = (y[i, ::f, ::f] > 0).nonzero() if u[0] < TUMOUR_CENTRED else y.new_zeros((0, 2))
        if len(tumour):
            cy, cx = tumour[int(u[1] * len(tumour))].tolist()
            y0, x0 = min(max(cy - size // 2, 0), h - size), min(max(cx - size // 2, 0), w - size)
        else:
            y0, x0 = int(u[1] * (h - size + 1)), int(u[2] * (w - size + 1))
        xs.append(x[i, :, y0 : y0 + size, x0 : x0 + size])
        ys.append(y[i, f * y0 : f * (y0 + size), f * x0 : f * (x0 + size)])
    return torch.stack(xs), torch.stack(ys)


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
    average: AveragedModel | None = None  # a moving average of the weights, or none


def moving_average(model: UNet, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights, ``train_step`` updating it; of its buffers
    too, so the average's batch-norm statistics are those of its own weights' era."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


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
    if opt.average is not None:
        opt.average.update_parameters(model)
    return loss.detach()
