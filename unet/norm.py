"""The normalisation after each convolution of the U-Net (``UNetConfig.norm``; the paper has none).

* ``batch``: batch norm; at inference it applies the statistics of the training slices to every scan.
* ``instance``: instance norm (nnU-Net's choice): each slice's features by their own statistics.
* ``ibn``: batch norm everywhere, but the network's first conv is followed by ``IBN``: instance norm
  on half its channels, batch norm on the other half (Pan et al. 2018, "Two at once: enhancing
  learning and generalization capacities via IBN-Net"): a scan's contrast and brightness, what
  differs most between scanners, are dropped where they enter; a training step costs 8 % more than
  with batch norm alone, 25 % with instance norm everywhere (``benchmarks/cpu_step.py``, 2 cores).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class IBN(nn.Module):
    """Instance norm on the first half of the channels, batch norm on the rest (Pan et al. 2018,
    IBN-Net: the instance half drops a scan's contrast and brightness, the batch half keeps what
    tells tissues apart)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        self.instance = nn.InstanceNorm2d(self.half, affine=True)
        self.batch = nn.BatchNorm2d(channels - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.split([self.half, x.shape[1] - self.half], dim=1)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return torch.cat([self.instance(a), self.batch(b)], dim=1).contiguous(memory_format=layout)


def norm_layer(norm: str | None, channels: int) -> list[nn.Module]:
    """The normalisation after a conv (none for the paper's network); ``ibn`` here is IBN's mixed layer."""
    if norm == "batch":
        return [nn.BatchNorm2d(channels)]
    if norm == "instance":
        return [nn.InstanceNorm2d(channels, affine=True)]
    return [IBN(channels)] if norm == "ibn" else []
