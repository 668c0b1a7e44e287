"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015, arXiv:1505.04597) in plain PyTorch.

Architecture, exactly as in the paper (Fig. 1):

* contracting path: ``depth`` levels of [3x3 conv + ReLU, 3x3 conv + ReLU] each followed
  by a 2x2 max-pool with stride 2; channels ``base -> 2*base -> ... -> base*2**depth``
  (paper: 64 -> 1024, the last pair of convs forming the bottleneck);
* expansive path: per level a 2x2 up-convolution (``ConvTranspose2d(k=2, s=2)``) that
  halves the channels, concatenation with the correspondingly (center-)cropped feature
  map of the contracting path, then [3x3 conv + ReLU] x 2;
* a final 1x1 convolution to ``num_classes`` logits;
* dropout at the end of the contracting path (``dropout``: the paper gives no rate; its Caffe model
  drops half of the last level's and of the bottleneck's outputs);
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

The loss (the paper's cross-entropy, and what is added to it) is ``unet/loss.py``.

Variants beyond the paper, each off by default: ``norm`` layers (``unet/norm.py``), 2.5D input (``context``: the
neighbouring axial slices as extra channels), ``deep_supervision`` (1x1 heads on the two decoder
levels above the full resolution, scored by the loss too), region ``outputs`` (``unet/outputs.py``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from unet.norm import norm_layer
from unet.outputs import Outputs, channels, probabilities

__all__ = ["UNetConfig", "UNet", "center_crop", "centre_slice", "mirror_pad"]


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
    norm: Literal["batch", "instance", "ibn"] | None = Field(
        None,
        description="normalisation after each 3x3 conv (paper: none); ibn: batch norm, but instance norm on half "
        "the channels of the network's first conv (IBN-Net)",
    )
    context: int = Field(
        0, ge=0, le=4, description="2.5D: neighbouring axial slices on each side as extra channels (paper: 0)"
    )
    deep_supervision: bool = Field(
        False, description="auxiliary outputs at 1/2 and 1/4 resolution in the loss (same padding; paper: off)"
    )
    outputs: Outputs = Field(
        "classes", description="classes: a soft-max over the classes (paper); regions: a sigmoid per region WT, TC, ET"
    )
    dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout at the end of the contracting path (paper: on; its Caffe model: 0.5)"
    )

    @model_validator(mode="after")
    def _supervised_outputs_need_same_padding(self) -> UNetConfig:
        if self.deep_supervision and (self.padding != "same" or self.depth < 3):
            raise ValueError("deep_supervision needs padding 'same' and depth >= 3")
        return self

    @property
    def input_channels(self) -> int:
        """Channels the first convolution takes: every modality of the slice and its ``context`` neighbours."""
        return self.in_channels * (2 * self.context + 1)


# ----------------------------------------------------------------------------- helpers


def center_crop(t: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Crop the last two (H, W) dims of ``t`` to ``size`` around the center (an odd difference drops
    the extra row/column at the bottom/right); ValueError if ``t`` is smaller than ``size``."""
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = t.shape[-2], t.shape[-1]
    if th > h or tw > w:
        raise ValueError(f"cannot center-crop {h}x{w} to larger size {th}x{tw}")
    top, left = (h - th) // 2, (w - tw) // 2
    return t[..., top : top + th, left : left + tw]


def mirror_pad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Reflect-pad the last two dims of ``x`` by ``pad = (left, right, top, bottom)``. Unlike one
    ``F.pad(mode="reflect")`` it takes pads >= the image size by reflecting repeatedly: the periodic
    mirror extension of the image (the paper's "missing context is extrapolated by mirroring")."""
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


def centre_slice(x: torch.Tensor, cfg: UNetConfig) -> torch.Tensor:
    """(N, input_channels, H, W) network input -> (N, in_channels, H, W): the slice itself, without the
    neighbours a 2.5D input carries (``context``)."""
    return x[:, cfg.context * cfg.in_channels : (cfg.context + 1) * cfg.in_channels]


# ----------------------------------------------------------------------------- blocks


class DoubleConv(nn.Sequential):
    """[3x3 conv (+ norm) + ReLU] x 2 — one level of either path; ``first``: another norm after the
    first conv (default: ``norm``)."""

    def __init__(self, c_in: int, c_out: int, padding: str, norm: str | None, first: str | None = None) -> None:
        pad = 0 if padding == "valid" else 1
        layers: list[nn.Module] = []
        for ci, kind in ((c_in, first or norm), (c_out, norm)):
            layers.append(nn.Conv2d(ci, c_out, kernel_size=3, padding=pad, bias=True))
            layers += norm_layer(kind, c_out)
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
        norm = "batch" if cfg.norm == "ibn" else cfg.norm  # ibn: the mixed layer after the first conv only
        self.down = nn.ModuleList(
            [DoubleConv(cfg.input_channels, c[0], cfg.padding, norm, first=cfg.norm)]
            + [DoubleConv(c[i], c[i + 1], cfg.padding, norm) for i in range(cfg.depth)]
        )  # down[-1] is the bottleneck
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()  # (the identity in eval mode)
        self.up = nn.ModuleList([Up(c[i + 1], c[i], cfg.padding, norm) for i in reversed(range(cfg.depth))])
        k = channels(cfg.outputs, cfg.num_classes)
        self.head = nn.Conv2d(c[0], k, kernel_size=1, bias=True)
        if cfg.deep_supervision:  # heads on the decoder's outputs at 1/2 and 1/4 resolution
            self.aux = nn.ModuleList([nn.Conv2d(c[i], k, kernel_size=1) for i in (1, 2)])
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

    def forward(self, x: torch.Tensor, aux: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Raw network: (N, input_channels, H, W) -> (N, num_classes, H', W') logits.

        H' = output_size(H) (valid mode: H - 184 for depth 4; same mode: H). ``aux`` (deep
        supervision): [logits, logits at H/2, logits at H/4], what ``unet.loss.SegLoss`` scores.
        """
        self.output_size(x.shape[-2])  # validate early with a readable error
        self.output_size(x.shape[-1])
        skips = []
        for i, level in enumerate(self.down[:-1]):
            x = level(x)
            x = self.drop(x) if i == self.cfg.depth - 1 else x  # the end of the contracting path
            skips.append(x)
            x = self.pool(x)
        x = self.drop(self.down[-1](x))
        decoded = []
        for up, skip in zip(self.up, reversed(skips)):
            x = up(x, skip)
            decoded.append(x)
        if not aux:
            return self.head(x)
        if not self.cfg.deep_supervision:
            raise ValueError("this network has no auxiliary outputs (deep_supervision is off)")
        return [self.head(x), self.aux[0](decoded[-2]), self.aux[1](decoded[-3])]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> (N, num_classes, h, w) float32 class probabilities, as ``cfg.outputs`` means them."""
        return probabilities(logits, self.cfg.outputs)

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
