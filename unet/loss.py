"""Categorical cross-entropy for the U-Net (Ronneberger et al., MICCAI 2015, arXiv:1505.04597).

The paper trains with a pixel-wise soft-max over the final feature map combined with the
cross-entropy loss, weighted per pixel to balance class frequencies. Here the weighting
is per class (``class_weights_from_counts``: inverse frequency ** power, normalised to mean
1), which matters for BraTS where the tumour classes (1 NCR/NET, 2 ED, 3 ET) cover a few
percent of the pixels.

Shapes: ``logits`` (N, C, h, w) and an integer ``target`` (N, H, W) with H >= h, W >= w.
A valid-mode U-Net returns logits smaller than its input (572 -> 388), so the target is
center-cropped to the logits' (h, w) with :func:`unet.model.center_crop` — the same crop
the network applies to its skip connections — before ``F.cross_entropy``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from unet.model import center_crop

__all__ = ["cross_entropy", "CrossEntropy", "class_weights_from_counts"]


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
            f"expected logits (N, C, h, w) and target (N, H, W), got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"batch mismatch: logits {logits.shape[0]}, target {target.shape[0]}")
    target = center_crop(target, (logits.shape[-2], logits.shape[-1])).long()
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, device=logits.device)
        if weight.shape != (logits.shape[1],):
            raise ValueError(
                f"class_weights must have shape ({logits.shape[1]},), got {tuple(weight.shape)}"
            )
        weight = weight.float()
    # float32 logits: F.cross_entropy autocasts to fp32 anyway; this also covers bf16
    # logits produced outside autocast.
    return F.cross_entropy(
        logits.float(), target, weight=weight, ignore_index=ignore_index, reduction=reduction
    )


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
        return cross_entropy(
            logits, target, self.class_weights, self.ignore_index, self.reduction
        )


def class_weights_from_counts(
    counts: torch.Tensor | np.ndarray | Sequence[float], power: float = 0.5
) -> torch.Tensor:
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
