"""What one forward of the U-Net costs: the FLOPs of its convolutions (``benchmarks/infer.py`` counts
them per tile to report the hardware's utilisation)."""

from __future__ import annotations

import torch.nn as nn

from unet.model import UNet


def flops_per_forward(model: UNet, h: int, w: int) -> int:
    """FLOPs (2 x multiply-accumulates) of all convs/up-convs in one raw forward of
    a single h x w input. Biases, ReLU, pooling, norms and concat are not counted.
    """
    model.output_size(h)
    model.output_size(w)
    valid = model.cfg.padding == "valid"
    total = 0

    def conv(m: nn.Conv2d, hh: int, ww: int) -> tuple[int, int]:
        nonlocal total
        if valid:
            hh, ww = hh - m.kernel_size[0] + 1, ww - m.kernel_size[1] + 1
        k = m.kernel_size[0] * m.kernel_size[1]
        total += 2 * m.in_channels * m.out_channels * k * hh * ww
        return hh, ww

    def double(block: nn.Module, hh: int, ww: int) -> tuple[int, int]:
        for m in block:
            if isinstance(m, nn.Conv2d):
                hh, ww = conv(m, hh, ww)
        return hh, ww

    for level in model.down[:-1]:
        h, w = double(level, h, w)
        h, w = h // 2, w // 2
    h, w = double(model.down[-1], h, w)
    for up in model.up:
        h, w = 2 * h, 2 * w  # each output pixel sees in_channels inputs (k == stride)
        total += 2 * up.up.in_channels * up.up.out_channels * h * w
        h, w = double(up.conv, h, w)
    total += 2 * model.head.in_channels * model.head.out_channels * h * w
    return total
