"""What the network's output channels mean, and the labels decided from them.

* ``classes`` (the paper): one logit per class (background, NCR/NET, ED, ET); the soft-max gives
  the class probabilities and the label is their argmax.
* ``regions`` (nnU-Net's BraTS entry, Isensee et al. 2020, arXiv:2011.00848): one logit per nested
  region WT ⊃ TC ⊃ ET, each a sigmoid, trained as three binary problems (``unet.loss``: binary
  cross-entropy + soft Dice): exactly what the test scores. The labels are painted back
  WT -> TC -> ET: edema where WT > 0.5, NCR/NET where TC > 0.5, enhancing where ET > 0.5, each over
  the last, so ET ⊂ TC ⊂ WT always.

Every prediction path works on class probabilities (K = 4, summing to 1). A region network's are
``P = (1 - WT, TC - ET, WT - TC, ET)`` (background, NCR/NET, ED, ET) of its region probabilities
made nested (TC := max(TC, ET), WT := max(WT, TC)): a region's classes sum to its probability, so
the quality estimate reads them alike, and the TTA and ensemble means and the linear upsampling
(all linear in P) average the region probabilities, from which ``labels_of`` paints exactly as
from the regions themselves.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from storage.brats import CLASS_REGIONS

Outputs = Literal["classes", "regions"]
REGION_CLASSES = CLASS_REGIONS  # WT, TC, ET -> network classes (0 bg, 1 NCR/NET, 2 ED, 3 ET)
PAINT_AT = 0.5


def channels(outputs: Outputs, num_classes: int) -> int:
    """Output channels of the network's head: one per class, or one per region."""
    return len(REGION_CLASSES) if outputs == "regions" else num_classes


def probabilities(logits: torch.Tensor, outputs: Outputs) -> torch.Tensor:
    """(N, channels, h, w) logits -> (N, 4, h, w) float32 class probabilities (see the module doc)."""
    if outputs == "classes":
        return torch.softmax(logits.float(), 1)
    wt, tc, et = torch.sigmoid(logits.float()).unbind(1)
    tc = torch.maximum(tc, et)
    wt = torch.maximum(wt, tc)
    return torch.stack([1 - wt, tc - et, wt - tc, et], 1)  # bg, NCR/NET, ED, ET


def labels_of(probs: torch.Tensor | np.ndarray, outputs: Outputs = "classes") -> torch.Tensor | np.ndarray:
    """(…, 4, h, w) class probabilities -> (…, h, w) uint8 network classes (numpy in, numpy out).

    ``classes``: the argmax, as a tournament of maxima (ties to the lower class, as ``argmax``; many
    times faster than ``argmax`` over a middle dimension). ``regions``: painted WT -> TC -> ET.
    """
    if isinstance(probs, np.ndarray):
        return labels_of(torch.from_numpy(probs), outputs).numpy()
    a, b, c, d = probs.unbind(-3)
    if outputs == "regions":
        painted = torch.where(a < 1 - PAINT_AT, 2, 0).to(torch.uint8)
        painted = torch.where(b + d > PAINT_AT, 1, painted).to(torch.uint8)
        return torch.where(d > PAINT_AT, 3, painted).to(torch.uint8)
    low, high = (b > a).to(torch.uint8), (d > c).to(torch.uint8) + 2
    return torch.where(torch.maximum(d, c) > torch.maximum(b, a), high, low)


def region_mask(labels: torch.Tensor, region: str) -> torch.Tensor:
    """The region's mask from network classes (``REGION_CLASSES``), by comparisons (``isin`` is slow)."""
    first, *rest = REGION_CLASSES[region]
    mask = labels == first
    for c in rest:
        mask |= labels == c
    return mask


def region_targets(target: torch.Tensor) -> torch.Tensor:
    """(N, H, W) network classes -> (N, 3, H, W) bool masks of WT, TC, ET."""
    return torch.stack([region_mask(target, region) for region in REGION_CLASSES], 1)


def region_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """(N, 4, H, W) class probabilities -> (N, 3, H, W): the probability of WT, TC, ET (their classes' sum)."""
    return torch.stack([probs[:, list(c)].sum(1) for c in REGION_CLASSES.values()], 1)


def binary_cross_entropy(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean binary cross-entropy of probabilities (not logits: they may be upsampled), in float32 and
    outside autocast's reach (``F.binary_cross_entropy`` refuses autocast on CUDA)."""
    p = probs.float().clamp(eps, 1 - eps)
    t = targets.float()
    return -(t * p.log() + (1 - t) * (1 - p).log()).mean()


def binary_cross_entropy_with_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
