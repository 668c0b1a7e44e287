"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015, arXiv:1505.04597) in plain PyTorch.

Architecture, exactly as in the paper (Fig. 1):

* contracting path: ``depth`` levels of [3x3 conv + ReLU, 3x3 conv + ReLU] each followed
  by a 2x2 max-pool with stride 2; channels ``base -> 2*base -> ... -> base*2**depth``
  (paper: 64 -> 1024, the last pair of convs forming the bottleneck);
* expansive path: per level a 2x2 up-convolution (``ConvTranspose2d(k=2, s=2)``) that
  halves the channels, concatenation with the correspondingly (center-)cropped feature
  map of the contracting path, then [3x3 conv + ReLU] x 2;
* a final 1x1 convolution to ``num_classes`` logits;
* no normalisation layers, conv biases on, He/Kaiming init ``N(0, sqrt(2/N))`` with ``N``
  the number of inputs of one neuron.

Shape arithmetic (per spatial dimension, ``d = depth``):

* ``padding="valid"`` (the paper, unpadded convs): every 3x3 conv removes 2 pixels, so a
  level removes 4. Every size entering a max-pool must be even. With ``b`` the size at
  the bottom of the network after its two convs (``b >= 1`` and every decoder size > 0)::

      input  = 2**d * b + 8 * 2**d - 4          (paper: 16*28 + 124 = 572)
      output = 2**d * b - 4 * (2**d - 1)        (paper: 16*28 -  60 = 388)
      input - output = 12 * 2**d - 8            (paper: 184, i.e. 92 px of context per side)

  so valid input sizes are ``124 + 16*b`` for the paper's depth 4 (..., 428, 444, ..., 572).
* ``padding="same"`` (zero-padded convs, the common variant): output size == input size;
  the input must be a multiple of ``2**d``.

:meth:`UNet.forward` is the raw network (valid mode shrinks the output);
:meth:`UNet.predict` implements the paper's overlap-tile strategy: the input is mirror
(reflect) padded so that the valid output covers the whole image, and cropped back, so
its logits always have the input's H, W (same mode: reflect pad to a multiple of
``2**d`` and crop back).

Loss: the paper trains with a pixel-wise soft-max over the final feature map combined with the
cross-entropy loss, weighted per pixel to balance class frequencies. Here the weighting is per
class (``class_weights_from_counts``: inverse frequency ** power, normalised to mean 1), which
matters for BraTS where the tumour classes cover a few percent of the pixels. A valid-mode
network's logits are smaller than its input, so the target is centre-cropped to them with
``center_crop``, the same crop the network applies to its skip connections.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "UNetConfig",
    "UNet",
    "center_crop",
    "mirror_pad",
    "cross_entropy",
    "CrossEntropy",
    "class_weights_from_counts",
]


class UNetConfig(BaseModel):
    """The network: the paper's U-Net and its variants."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    in_channels: int = Field(4, ge=1, description="input channels: flair, t1, t1ce, t2 (fixed by the data)")
    num_classes: int = Field(4, ge=1, description="classes: background, NCR/NET, ED, ET (fixed by the data)")
    base_channels: int = Field(
        64, ge=1, description="channels of the first level, doubled at each level down (paper: 64)"
    )
    depth: int = Field(4, ge=1, description="number of 2x2 max-pools (paper: 4)")
    padding: Literal["valid", "same"] = Field(
        "valid", description="valid: the paper's unpadded convs (overlap-tile); same: zero-padded"
    )
    norm: Literal["batch", "instance"] | None = Field(
        None, description="normalisation after each 3x3 conv (paper: none)"
    )


# ----------------------------------------------------------------------------- helpers


def center_crop(t: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Crop the last two (H, W) dims of ``t`` to ``size`` around the center.

    If the size difference is odd the extra row/column is dropped at the bottom/right.
    Raises ValueError if ``t`` is smaller than ``size``.
    """
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = t.shape[-2], t.shape[-1]
    if th > h or tw > w:
        raise ValueError(f"cannot center-crop {h}x{w} to larger size {th}x{tw}")
    top, left = (h - th) // 2, (w - tw) // 2
    return t[..., top : top + th, left : left + tw]


def mirror_pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Reflect-pad the last two dims of ``x`` by ``pad = (left, right, top, bottom)``.

    Unlike a single ``F.pad(mode="reflect")`` this accepts pads >= the image size by
    reflecting repeatedly, which yields the periodic mirror extension of the image (the
    paper's "missing context is extrapolated by mirroring the input image").
    """
    left, right, top, bottom = pad
    if min(pad) < 0:
        raise ValueError(f"pad must be non-negative, got {pad}")
    while left or right or top or bottom:
        h, w = x.shape[-2], x.shape[-1]
        if (h < 2 and (top or bottom)) or (w < 2 and (left or right)):
            raise ValueError(f"cannot mirror-pad a {h}x{w} image")
        step = (min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1))
        x = F.pad(x, step, mode="reflect")
        left, right, top, bottom = (p - s for p, s in zip((left, right, top, bottom), step))
    return x


# ----------------------------------------------------------------------------- blocks


class DoubleConv(nn.Sequential):
    """[3x3 conv (+ norm) + ReLU] x 2 — one level of either path."""

    def __init__(self, c_in: int, c_out: int, padding: str, norm: str | None) -> None:
        pad = 0 if padding == "valid" else 1
        layers: list[nn.Module] = []
        for ci in (c_in, c_out):
            layers.append(nn.Conv2d(ci, c_out, kernel_size=3, padding=pad, bias=True))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(c_out))
            elif norm == "instance":
                layers.append(nn.InstanceNorm2d(c_out, affine=True))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Up(nn.Module):
    """2x2 up-conv halving channels, concat with the cropped skip map, DoubleConv."""

    def __init__(self, c_in: int, c_out: int, padding: str, norm: str | None) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2, bias=True)
        self.conv = DoubleConv(2 * c_out, c_out, padding, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        skip = center_crop(skip, (x.shape[-2], x.shape[-1]))  # no-op in same mode
        return self.conv(torch.cat([skip, x], dim=1))


# ----------------------------------------------------------------------------- model


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = [cfg.base_channels * 2**i for i in range(cfg.depth + 1)]  # 64 ... 1024
        self.down = nn.ModuleList(
            [DoubleConv(cfg.in_channels, c[0], cfg.padding, cfg.norm)]
            + [DoubleConv(c[i], c[i + 1], cfg.padding, cfg.norm) for i in range(cfg.depth)]
        )  # down[-1] is the bottleneck
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.up = nn.ModuleList([Up(c[i + 1], c[i], cfg.padding, cfg.norm) for i in reversed(range(cfg.depth))])
        self.head = nn.Conv2d(c[0], cfg.num_classes, kernel_size=1, bias=True)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # He et al. 2015, as the paper recommends: std = sqrt(2 / N), N = inputs per neuron.
        if isinstance(m, nn.Conv2d):
            n = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.ConvTranspose2d):
            # with kernel == stride each output pixel sees exactly one input pixel per channel
            n = m.in_channels
        else:
            return
        nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / n))
        if m.bias is not None:
            nn.init.zeros_(m.bias)

    # ---- forward -------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw network: (N, in_channels, H, W) -> (N, num_classes, H', W') logits.

        H' = output_size(H) (valid mode: H - 184 for depth 4; same mode: H).
        """
        self.output_size(x.shape[-2])  # validate early with a readable error
        self.output_size(x.shape[-1])
        skips = []
        for level in self.down[:-1]:
            x = level(x)
            skips.append(x)
            x = self.pool(x)
        x = self.down[-1](x)
        for up, skip in zip(self.up, reversed(skips)):
            x = up(x, skip)
        return self.head(x)

    # ---- shape arithmetic ----------------------------------------------------------

    def _valid_output(self, n: int) -> tuple[int, str]:
        """Valid-mode output size for input ``n``, or (-1, reason) if it does not tile."""
        size = n
        for level in range(self.cfg.depth):
            n -= 4
            if n < 2 or n % 2:
                return -1, f"size {n} before max-pool {level + 1} must be even and >= 2"
            n //= 2
        n -= 4  # bottleneck convs
        for _ in range(self.cfg.depth):
            if n < 1:
                break
            n = 2 * n - 4  # 2x2 up-conv, then two 3x3 valid convs
        if n < 1:
            return -1, f"input {size} is too small (a feature map shrinks to {n})"
        return n, ""

    def output_size(self, input_size: int) -> int:
        """Spatial output size of :meth:`forward` for one spatial input dim.

        Raises ValueError if the input does not tile exactly: in valid mode every size
        entering a max-pool must be even and every intermediate size positive; in same
        mode the input must be a positive multiple of ``2**depth``.
        """
        s = 2**self.cfg.depth
        if self.cfg.padding == "same":
            if input_size < 1 or input_size % s:
                raise ValueError(
                    f"same mode needs an input size that is a positive multiple of 2**depth={s}, got {input_size}"
                )
            return input_size
        out, why = self._valid_output(input_size)
        if out < 0:
            hint = self._smallest_valid_input(input_size)
            raise ValueError(f"valid input size {input_size} does not tile: {why} (nearest valid size >= it: {hint})")
        return out

    def _smallest_valid_input(self, at_least: int) -> int:
        # valid inputs are s*b + 8*s - 4 (b = bottom size); tiny b makes the decoder vanish
        s = 2**self.cfg.depth
        b = max(1, -(-(at_least - 8 * s + 4) // s))
        while self._valid_output(s * b + 8 * s - 4)[0] < 0:
            b += 1
        return s * b + 8 * s - 4

    def input_size_for(self, output_size: int) -> int:
        """Smallest input size whose :meth:`output_size` is >= ``output_size``.

        Valid mode: smallest valid tile input (paper config: 388 -> 572, 240 -> 428).
        Same mode: ``output_size`` rounded up to a multiple of ``2**depth``.
        """
        if output_size < 1:
            raise ValueError(f"output_size must be >= 1, got {output_size}")
        s = 2**self.cfg.depth
        if self.cfg.padding == "same":
            return -(-output_size // s) * s
        # output = s*b - 4*(s - 1) = input - (12*s - 8)
        return self._smallest_valid_input(output_size + 12 * s - 8)

    # ---- inference -----------------------------------------------------------------

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits with the same H, W as ``x`` for any H, W and batch size.

        Valid mode (overlap-tile strategy of the paper): the image is mirror-padded to
        ``input_size_for(H) x input_size_for(W)`` so that the valid output covers it,
        the network is run once, and the output is cropped to the image's footprint.
        Same mode: reflect-pad to a multiple of ``2**depth`` and crop back.
        Gradients flow; wrap calls in ``torch.inference_mode()`` for inference.
        """
        h, w = x.shape[-2], x.shape[-1]
        ih, iw = self.input_size_for(h), self.input_size_for(w)
        ph, pw = ih - h, iw - w
        top, left = ph // 2, pw // 2
        xp = mirror_pad(x, (left, pw - left, top, ph - top))
        y = self(xp)
        # output pixel j sits over padded-input pixel j + (in - out) // 2; image pixel i
        # sits at padded-input pixel i + top, so the image starts at output row top - off.
        off_h, off_w = (ih - y.shape[-2]) // 2, (iw - y.shape[-1]) // 2
        r0, c0 = top - off_h, left - off_w
        return y[..., r0 : r0 + h, c0 : c0 + w]

    # ---- accounting ----------------------------------------------------------------

    def flops_per_forward(self, h: int, w: int) -> int:
        """FLOPs (2 x multiply-accumulates) of all convs/up-convs in one raw forward of
        a single h x w input. Biases, ReLU, pooling, norms and concat are not counted.
        """
        self.output_size(h)
        self.output_size(w)
        valid = self.cfg.padding == "valid"
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

        for level in self.down[:-1]:
            h, w = double(level, h, w)
            h, w = h // 2, w // 2
        h, w = double(self.down[-1], h, w)
        for up in self.up:
            h, w = 2 * h, 2 * w  # each output pixel sees in_channels inputs (k == stride)
            total += 2 * up.up.in_channels * up.up.out_channels * h * w
            h, w = double(up.conv, h, w)
        total += 2 * self.head.in_channels * self.head.out_channels * h * w
        return total


# ----------------------------------------------------------------------------- loss


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
