"""The training loss: the paper's pixel-wise cross-entropy, and what BraTS models add to it.

* ``cross_entropy`` / ``CrossEntropy``: soft-max over the final feature map + categorical
  cross-entropy, class-weighted (``class_weights_from_counts``: inverse frequency ** power,
  normalised to mean 1; the paper weights per pixel to balance class frequencies). A valid-mode
  network's logits are smaller than its input: the target is centre-cropped to them.
* ``SegLoss``: what training uses. Cross-entropy, optionally plus the soft Dice of the BraTS
  regions (WT, TC, ET: what the test scores), of the network's output, or outputs with deep
  supervision (auxiliary outputs at 1/2 and 1/4 resolution, weighted 1/2 and 1/4, against the
  labels taken every 2nd / 4th pixel). Labels may be an integer multiple of the output's resolution
  (the ``tp`` profile keeps them at 1 mm while the network sees 2 mm): the class probabilities are
  then upsampled linearly to the labels, exactly as inference upsamples them
  (``unet.geometry.Geometry.restore``), and scored there.
* For a network with region outputs (``unet.outputs``): binary cross-entropy of each region's
  sigmoid (WT, TC, ET), + their soft Dice; no class weights (each region is its own problem).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from unet.model import center_crop
from unet.outputs import (
    Outputs,
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    region_probabilities,
    region_targets,
)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | Sequence[float] | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Pixel-wise categorical cross-entropy.

    ``logits``: (N, C, h, w); ``target``: (N, H, W) class indices (any integer dtype),
    center-cropped to (h, w) if larger. ``class_weights``: (C,) or None. With weights and
    ``reduction="mean"`` the result is ``sum_i w[y_i] * nll_i / sum_i w[y_i]`` over the
    non-ignored pixels (``F.cross_entropy`` semantics).
    """
    if logits.ndim != 4 or target.ndim != 3:
        raise ValueError(
            f"expected logits (N, C, h, w) and target (N, H, W), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"batch mismatch: logits {logits.shape[0]}, target {target.shape[0]}")
    target = center_crop(target, (logits.shape[-2], logits.shape[-1])).long()
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, device=logits.device)
        if weight.shape != (logits.shape[1],):
            raise ValueError(f"class_weights must have shape ({logits.shape[1]},), got {tuple(weight.shape)}")
        weight = weight.float()
    # float32 logits: F.cross_entropy autocasts to fp32 anyway; this also covers bf16
    # logits produced outside autocast.
    return F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index, reduction=reduction)


class CrossEntropy(nn.Module):
    """Module wrapper of :func:`cross_entropy`; class weights live in a buffer so they
    follow ``.to(device)`` and are saved in the state dict."""

    class_weights: torch.Tensor | None

    def __init__(
        self,
        class_weights: torch.Tensor | Sequence[float] | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        w = None if class_weights is None else torch.as_tensor(class_weights).float()
        self.register_buffer("class_weights", w)
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, target, self.class_weights, self.ignore_index, self.reduction)


def class_weights_from_counts(counts: torch.Tensor | np.ndarray | Sequence[float], power: float = 0.5) -> torch.Tensor:
    """Per-class weights ``(total / count) ** power`` normalised to mean 1 (float32).

    ``power=1`` is plain inverse frequency, ``0.5`` (default) its square root — softer,
    so a class with 1% of the pixels gets ~10x (not 100x) the weight of a 100% class.
    A class with zero count (absent from the data) gets the weight of the rarest present
    class rather than infinity.
    """
    if isinstance(counts, torch.Tensor):
        c = counts.detach().to("cpu", torch.float64)
    else:
        c = torch.as_tensor(np.asarray(counts, dtype=np.float64))
    if c.ndim != 1 or c.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {tuple(c.shape)}")
    if not torch.isfinite(c).all() or (c < 0).any():
        raise ValueError(f"counts must be finite and non-negative, got {c.tolist()}")
    present = c > 0
    if not present.any():
        raise ValueError("all class counts are zero")
    w = torch.zeros_like(c)
    w[present] = (c.sum() / c[present]) ** power
    w[~present] = w[present].max()
    return (w / w.mean()).float()


def upsample_linear(a: torch.Tensor, f: int) -> torch.Tensor:
    """(..., h, w) -> (..., f*h, f*w), linear along both axes; sample i lands on output f*i and the
    edge value is held past the last sample (``unet.geometry._upsample_linear``'s rule)."""
    if f == 1:
        return a
    for dim in (-2, -1):
        n = a.shape[dim]
        nxt = torch.cat([a.narrow(dim, 1, n - 1), a.narrow(dim, n - 1, 1)], dim)  # a[i + 1], the edge held
        parts = torch.stack([torch.lerp(a, nxt, r / f) for r in range(f)], dim=dim)  # (..., n, f, ...)
        a = parts.flatten(dim - 1, dim) if dim == -1 else parts.flatten(-3, -2)  # output f*i + r
    return a


def region_dice(probs: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice of the BraTS regions WT, TC, ET over the whole batch: (N, 3, H, W) region
    probabilities and (N, 3, H, W) region masks -> (3,) Dice. ``smooth`` (in pixels) keeps a region
    absent from the batch and from the prediction at 1."""
    t = targets.to(probs.dtype)
    dims = (0, 2, 3)
    return (2 * (probs * t).sum(dims) + smooth) / (probs.sum(dims) + t.sum(dims) + smooth)


DEEP_SUPERVISION_WEIGHTS = (1.0, 0.5, 0.25)  # the full-resolution output, then 1/2 and 1/4


class SegLoss(nn.Module):
    """The loss of one output or of the outputs of deep supervision (full resolution first).

    ``outputs="classes"``: cross-entropy (class-weighted), + the soft Dice of the regions (their
    classes' probabilities summed) when ``dice``. ``outputs="regions"``: binary cross-entropy of each
    region's sigmoid, + its soft Dice when ``dice`` (nnU-Net's BraTS loss). See the module docstring.
    """

    class_weights: torch.Tensor | None

    def __init__(
        self,
        class_weights: torch.Tensor | Sequence[float] | None = None,
        dice: bool = False,
        outputs: Outputs = "classes",
    ) -> None:
        super().__init__()
        w = None if class_weights is None else torch.as_tensor(class_weights).float()
        self.register_buffer("class_weights", w)
        self.dice = dice
        self.outputs = outputs

    def forward(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        outputs = [logits] if isinstance(logits, torch.Tensor) else list(logits)
        weights = DEEP_SUPERVISION_WEIGHTS[: len(outputs)]
        total = sum(w * self._one(out, target, first=i == 0) for i, (out, w) in enumerate(zip(outputs, weights)))
        return total / sum(weights)

    def _one(self, logits: torch.Tensor, target: torch.Tensor, first: bool) -> torch.Tensor:
        h, w = logits.shape[-2:]
        f = target.shape[-1] // w
        if not first and f > 1:  # an auxiliary output: the labels at its resolution
            target, f = target[..., :: target.shape[-2] // h, ::f], 1
        fine = f > 1 and target.shape[-2:] == (f * h, f * w)  # labels at f times the output's resolution
        if not fine:
            target = center_crop(target, (h, w))
        target = target.long()
        if self.outputs == "regions":
            return self._regions(logits, region_targets(target), f if fine else 1)
        if not fine:
            loss = cross_entropy(logits, target, self.class_weights)
            probs = torch.softmax(logits.float(), 1) if self.dice else None
        else:  # probabilities upsampled to the labels
            probs = upsample_linear(torch.softmax(logits.float(), 1), f)
            weight = None if self.class_weights is None else self.class_weights.float()
            loss = F.nll_loss(probs.clamp_min(1e-8).log(), target, weight=weight)
        if self.dice:
            loss = loss + 1.0 - region_dice(region_probabilities(probs), region_targets(target)).mean()
        return loss

    def _regions(self, logits: torch.Tensor, targets: torch.Tensor, f: int) -> torch.Tensor:
        if f == 1:
            loss = binary_cross_entropy_with_logits(logits, targets)
            probs = torch.sigmoid(logits.float())
        else:
            probs = upsample_linear(torch.sigmoid(logits.float()), f)
            loss = binary_cross_entropy(probs, targets)
        if self.dice:
            loss = loss + 1.0 - region_dice(probs, targets).mean()
        return loss
