"""Data augmentation of training slices, in two halves: parameters drawn on the CPU, applied on the device.

A loader worker draws one sample's parameters (``augment_params``: a few floats from a generator
seeded by the sample's key, so a resumed run replays them); ``apply_augment`` applies a whole
batch of them where the network runs, where a ``grid_sample`` or a convolution over the batch is
nearly free. So the CPU side reads and decompresses chunks and nothing else.

The sets (``AUGMENTATIONS``):

* ``light``: left-right flips, small rotations, per-channel gain and offset;
* ``strong``: nnU-Net's 2D set (Isensee et al., Nature Methods 2021): rotation and scaling, then
  Gaussian noise, Gaussian blur, brightness, contrast, low-resolution simulation and gamma (also
  inverted), each with its own probability;
* ``scanner``: ``strong`` and what another scanner changes in each modality on its own: a smooth
  multiplicative bias field (a quadratic in-plane, as MR coil inhomogeneity is), wider brightness
  and offset, contrast and gamma more often;
* ``gin``: ``strong`` and, for half the samples, global intensity non-linear augmentation (GIN,
  Ouyang et al., IEEE TMI 2022, for segmentation on an unseen site): each modality through its own
  shallow network of random 1x1 or 3x3 convolutions and leaky ReLUs, drawn afresh per sample,
  rescaled to the modality's brain mean and spread and mixed with the image by a random share.
  Shapes stay (the labels hold); contrast and texture become ones no scanner in training gave.
* ``drop``: ``strong`` and, for a quarter of the samples, one modality drawn at random blanked (set
  to 0, the brain's mean z-score) on every slice of the sample: modality dropout (ModDrop, Neverova
  et al. 2015), so the network learns each region from more than one modality (the edema from FLAIR
  and T2 both) and one modality that looks unlike training's does not decide alone.
* ``drop-but-t1ce``: ``drop`` with the modality drawn from FLAIR, T1 and T2 only: T1ce is the one
  modality that shows enhancement, and a network asked for the enhancing tumour without it learns
  to guess ET from the core's look, which draws it too large where the core is large and the ET small.

Spatial changes move image, labels and the brain mask with one sampling grid (bilinear for the
image, nearest for labels; labels may be on a finer grid than the image, as in the ``tp`` profile).
Intensity changes act on brain voxels only: background stays exactly 0. Channels carry the four
modalities of one slice, or of a slice and its neighbours (2.5D); a modality gets the same
intensity change on every slice of a sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

MODALITIES = 4  # intensity parameters are drawn per modality (flair, t1, t1ce, t2)


@dataclass(frozen=True)
class AugmentConfig:
    flip_lr: float = 0.5  # probability of a left-right flip (H is the L-R axis)
    rotate_degrees: float = 10.0  # angle uniform in +- this ...
    p_rotate: float = 1.0  # ... with this probability
    scale: tuple[float, float] = (1.0, 1.0)  # zoom uniform in this range ...
    p_scale: float = 0.0
    intensity_scale: float = 0.1  # per-modality gain uniform in 1 +- this (brightness)
    intensity_shift: float = 0.1  # per-modality offset uniform in +- this, in z-score units
    p_noise: float = 0.0  # Gaussian noise with a standard deviation uniform in [0, noise_std]
    noise_std: float = 0.0
    p_blur: float = 0.0  # per modality: Gaussian blur with sigma uniform in blur_sigma
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_contrast: float = 0.0  # per modality: (x - mean) * factor + mean, factor uniform in contrast
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.0  # per modality: down to a zoom uniform in lowres (nearest), back up (bicubic)
    lowres: tuple[float, float] = (0.5, 1.0)
    p_gamma: float = 0.0  # per modality: x in [0, 1] of its brain range -> x ** gamma, gamma uniform in gamma
    gamma: tuple[float, float] = (0.7, 1.5)
    p_invert_gamma: float = 0.0  # ... applied to 1 - x instead
    p_bias: float = 0.0  # per modality: a bias field exp(quadratic in x, y), coefficients uniform in +- bias
    bias: float = 0.3
    p_gin: float = 0.0  # per sample: GIN (``_gin``), mixed in by a share uniform in [0, 1]
    p_drop: float = 0.0  # per sample: one modality, drawn at random, blanked (0) on every context slice
    drop_from: tuple[int, ...] = (0, 1, 2, 3)  # ... from these (0 flair, 1 t1, 2 t1ce, 3 t2)


_STRONG = AugmentConfig(
    rotate_degrees=30.0,
    p_rotate=0.5,
    scale=(0.7, 1.4),
    p_scale=0.3,
    intensity_scale=0.25,
    intensity_shift=0.1,
    p_noise=0.15,
    noise_std=0.1,
    p_blur=0.2,
    p_contrast=0.15,
    p_lowres=0.25,
    p_gamma=0.3,
    p_invert_gamma=0.1,
)
AUGMENTATIONS: dict[str, AugmentConfig | None] = {
    "off": None,
    "light": AugmentConfig(),
    "strong": _STRONG,
    "scanner": replace(_STRONG, intensity_scale=0.3, intensity_shift=0.2, p_contrast=0.3, p_bias=0.3),
    "gin": replace(_STRONG, p_gin=0.5),
    "drop": replace(_STRONG, p_drop=0.25),
    "drop-but-t1ce": replace(_STRONG, p_drop=0.25, drop_from=(0, 1, 3)),
}

# One sample's parameters, in this order (M = MODALITIES): flip, angle, zoom, noise std, noise seed,
# invert gamma, GIN's share, the blanked modality (1-4; 0: none), then per modality: gain, shift, blur
# sigma, contrast, low-res zoom, gamma, and the bias field's coefficients of x, y, x², y², xy
# (coordinates in [-1, 1]).
_SCALARS = 8
_BIAS = ("bias_x", "bias_y", "bias_xx", "bias_yy", "bias_xy")
_PER_MODALITY = ("gain", "shift", "blur", "contrast", "lowres", "gamma", *_BIAS)
BIAS_OFFSET = 3.0  # a bias field multiplies raw intensities: z' = b z + (b - 1) * mean/std, mean/std about this
N_PARAMS = _SCALARS + len(_PER_MODALITY) * MODALITIES


def augment_params(cfg: AugmentConfig | None, rng: np.random.Generator | None) -> np.ndarray:
    """(N_PARAMS,) float32 parameters of one sample; ``cfg`` or ``rng`` None gives the identity (with
    ``rng``, still the sample's own seed ``p[4]``: ``unet.step.crop`` draws its patch from it)."""
    p = identity_params()
    if rng is None:
        return p
    if cfg is None:
        p[4] = rng.integers(0, 2**24)
        return p
    m = MODALITIES

    def maybe(prob: float, low: float, high: float, size: int | None = None, off: float = 1.0):
        draw = rng.uniform(low, high, size)
        return np.where(rng.random(size) < prob, draw, off) if prob < 1 else draw

    p[0] = float(rng.random() < cfg.flip_lr)
    p[1] = np.deg2rad(maybe(cfg.p_rotate, -cfg.rotate_degrees, cfg.rotate_degrees, off=0.0))
    p[2] = maybe(cfg.p_scale, *cfg.scale)
    p[3] = maybe(cfg.p_noise, 0.0, cfg.noise_std, off=0.0)
    p[4] = rng.integers(0, 2**24)  # exact in float32
    p[5] = float(rng.random() < cfg.p_invert_gamma)
    per = {
        "gain": 1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale, m),
        "shift": rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, m),
        "blur": maybe(cfg.p_blur, *cfg.blur_sigma, m, off=0.0),
        "contrast": maybe(cfg.p_contrast, *cfg.contrast, m),
        "lowres": maybe(cfg.p_lowres, *cfg.lowres, m),
        "gamma": maybe(1.0 if p[5] else cfg.p_gamma, *cfg.gamma, m),
    }
    biased = rng.random(m) < cfg.p_bias
    for name in _BIAS:
        per[name] = np.where(biased, rng.uniform(-cfg.bias, cfg.bias, m), 0.0)
    for i, name in enumerate(_PER_MODALITY):
        p[_SCALARS + i * m : _SCALARS + (i + 1) * m] = per[name]
    if cfg.p_gin:  # drawn last and only here: the other sets replay the draws they always made
        p[6] = maybe(cfg.p_gin, 0.0, 1.0, off=0.0)
    if cfg.p_drop and rng.random() < cfg.p_drop:
        p[7] = 1 + cfg.drop_from[rng.integers(0, len(cfg.drop_from))]
    return p


def identity_params() -> np.ndarray:
    p = np.zeros(N_PARAMS, dtype=np.float32)
    p[2] = 1.0  # zoom
    for name in ("gain", "contrast", "lowres", "gamma"):
        i = _PER_MODALITY.index(name)
        p[_SCALARS + i * MODALITIES : _SCALARS + (i + 1) * MODALITIES] = 1.0
    return p


def _per_channel(params: torch.Tensor, name: str, channels: int) -> torch.Tensor:
    """(N, channels) values of one per-modality parameter: channel j is modality j % MODALITIES."""
    i = _SCALARS + _PER_MODALITY.index(name) * MODALITIES
    return params[:, i : i + MODALITIES][:, torch.arange(channels, device=params.device) % MODALITIES]


def apply_augment(x: torch.Tensor, y: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (N, C, H, W) float image, (N, H', W') classes (H' a multiple of H), (N, N_PARAMS)
    params -> augmented, on the same device. Identity params return the batch unchanged (up to
    float rounding of the resampling)."""
    params = params.to(x.device, torch.float32)
    x, y, brain = _spatial(x, y, params)
    c = x.shape[1]
    if (params[:, 6] > 0).any():
        x = _gin(x, brain, params[:, 6], params[:, 4])
    if (params[:, 3] > 0).any():
        noise = torch.stack(
            [torch.randn(x.shape[1:], generator=_generator(x.device, int(s))) for s in params[:, 4].tolist()]
        ).to(x.device)
        x = x + noise * params[:, 3, None, None, None]
    if (sigma := _per_channel(params, "blur", c)).gt(0).any():
        x = _blur(x, sigma)
    x = x * _per_channel(params, "gain", c)[:, :, None, None]
    if (factor := _per_channel(params, "contrast", c)).ne(1).any():
        mean = (x * brain).sum((2, 3), keepdim=True) / brain.sum((2, 3), keepdim=True).clamp_min(1)
        x = (x - mean) * factor[:, :, None, None] + mean
    if (zoom := _per_channel(params, "lowres", c)).ne(1).any():
        x = _low_resolution(x, zoom)
    if (gamma := _per_channel(params, "gamma", c)).ne(1).any():
        x = _gamma(x, brain, gamma, params[:, 5])
    if (coef := torch.stack([_per_channel(params, name, c) for name in _BIAS], -1)).ne(0).any():
        x = _bias_field(x, coef)
    x = x + _per_channel(params, "shift", c)[:, :, None, None]
    if (params[:, 7] > 0).any():  # modality dropout: channel j is modality j % MODALITIES
        modality = torch.arange(c, device=x.device) % MODALITIES + 1
        brain = brain & (modality[None, :] != params[:, 7, None])[:, :, None, None]
    return torch.where(brain, x, torch.zeros((), device=x.device)), y


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)  # drawn on the CPU: the same noise on any device


def _spatial(x: torch.Tensor, y: torch.Tensor, params: torch.Tensor):
    """Flip, rotation and zoom about the centre as one sampling grid per resolution; returns the image,
    the classes and the (N, 1, H, W) brain mask, all moved alike."""
    flip, angle, zoom = params[:, 0], params[:, 1], params[:, 2]
    brain = (x != 0).any(1, keepdim=True)
    if not ((flip != 0).any() or (angle != 0).any() or (zoom != 1).any()):
        return x, y, brain
    n = x.shape[0]
    cos, sin, mirror, zero = torch.cos(angle) / zoom, torch.sin(angle) / zoom, 1.0 - 2.0 * flip, torch.zeros_like(angle)
    # (x, y) = (W, H) sampling coordinates: rotation R / zoom times the mirror diag(1, m) of y
    theta = torch.stack([torch.stack([cos, -sin * mirror, zero], 1), torch.stack([sin, cos * mirror, zero], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, *x.shape[-2:]], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brain = F.grid_sample(brain.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False) > 0
    label_grid = grid if y.shape[-2:] == x.shape[-2:] else F.affine_grid(theta, [n, 1, *y.shape[-2:]], False)
    y = F.grid_sample(y[:, None].float(), label_grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x, y[:, 0].to(torch.uint8), brain


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per (sample, channel); sigma 0 leaves the channel as it is."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.reshape(-1, 1).clamp_min(1e-3)
    kernel = torch.exp(-0.5 * (t / s) ** 2)
    kernel = torch.where(sigma.reshape(-1, 1) > 0, kernel, (t == 0).to(x.dtype))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (N*C, K)
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=n * c)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * c)
    return flat.reshape(n, c, h, w)


def _low_resolution(x: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """Each (sample, channel) with a zoom below 1: down to that size (nearest), back up (bicubic)."""
    out = x.clone()
    h, w = x.shape[-2:]
    for i, j in torch.nonzero(zoom < 1).tolist():
        z = float(zoom[i, j])
        small = F.interpolate(x[i, j][None, None], size=(max(1, round(h * z)), max(1, round(w * z))), mode="nearest")
        out[i, j] = F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    return out


def _bias_field(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Each (sample, channel) times a smooth field b = exp(c1 x + c2 y + c3 x² + c4 y² + c5 xy) over the
    plane (coordinates in [-1, 1]), as a scanner's coil multiplies raw intensities; on z-scores that
    is z -> b z + (b - 1) * BIAS_OFFSET."""
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device), indexing="ij"
    )
    basis = torch.stack([xx, yy, xx * xx, yy * yy, xx * yy])  # (5, H, W)
    b = torch.exp(torch.einsum("nck,khw->nchw", coef, basis))
    return b * x + (b - 1) * BIAS_OFFSET


def _gamma(x: torch.Tensor, brain: torch.Tensor, gamma: torch.Tensor, invert: torch.Tensor) -> torch.Tensor:
    """Gamma on each channel's brain range: x -> lo + (hi - lo) * ((x - lo) / (hi - lo)) ** gamma (or the
    same on the inverted range), so the channel keeps its range and only the curve changes."""
    big = torch.finfo(x.dtype).max
    lo = torch.where(brain, x, big).amin((2, 3), keepdim=True)
    hi = torch.where(brain, x, -big).amax((2, 3), keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    u = ((x - lo) / span).clamp(0, 1)
    inv = invert[:, None, None, None] > 0
    u = torch.where(inv, 1 - u, u) ** gamma[:, :, None, None]
    u = torch.where(inv, 1 - u, u)
    return torch.where(gamma[:, :, None, None] != 1, lo + span * u, x)


GIN_LAYERS, GIN_WIDTH = 4, 2  # GIN's random network: 4 convolutions, 2 channels between them (the paper's)


def _gin(x: torch.Tensor, brain: torch.Tensor, share: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """GIN on the samples with ``share`` > 0: each (sample, modality) through its own random network
    (weights from the sample's seed, so a resumed run replays them; one network for the modality on
    every slice of its 2.5D context), rescaled to the brain mean and standard deviation the modality
    had, then ``share * gin + (1 - share) * image``. Channel j is modality j % MODALITIES."""
    on = torch.nonzero(share > 0)[:, 0].tolist()
    n_on, c, h, w = len(on), x.shape[1], *x.shape[-2:]
    m = MODALITIES
    xs = x[on]  # the samples GIN changes (indexing copies: once)
    # slices of the context as the batch, (sample, modality) as channels: a grouped conv gives each its own net
    g = xs.reshape(n_on, c // m, m, h, w).transpose(0, 1).reshape(c // m, n_on * m, h, w)
    g = g.contiguous(memory_format=torch.channels_last)  # grouped convolutions: twice as fast on CPU (oneDNN)
    gens = [torch.Generator().manual_seed(int(seeds[i]) + 2) for i in on]  # + 1 is unet.step.crop's
    for layer in range(GIN_LAYERS):
        c_in = 1 if layer == 0 else GIN_WIDTH
        c_out = 1 if layer == GIN_LAYERS - 1 else GIN_WIDTH
        kernels, shifts = [], []
        for gen in gens:
            k = torch.randn(m * c_out, c_in, 3, 3, generator=gen)
            if torch.rand(1, generator=gen).item() < 0.5:  # a 1x1 kernel: the 3x3's centre alone
                k = k * F.pad(torch.ones(1, 1, 1, 1), (1, 1, 1, 1))
            kernels.append(k)
            shifts.append(torch.randn(m * c_out, generator=gen))
        g = F.conv2d(g, torch.cat(kernels).to(x.device), torch.cat(shifts).to(x.device), padding=1, groups=n_on * m)
        if layer < GIN_LAYERS - 1:
            g = F.leaky_relu(g)
    g = g.reshape(c // m, n_on, m, h, w).transpose(0, 1).reshape(n_on, c, h, w)
    inside = brain[on].to(x.dtype)
    count = inside.sum((2, 3), keepdim=True).clamp_min(1)

    def moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (t * inside).sum((2, 3), keepdim=True) / count
        return mean, (((t - mean) * inside) ** 2).sum((2, 3), keepdim=True).div(count).sqrt().clamp_min(1e-6)

    (mean_x, std_x), (mean_g, std_g) = moments(xs), moments(g)
    g = (g - mean_g) / std_g * std_x + mean_x
    a = share[on][:, None, None, None]
    out = x.clone()
    out[on] = a * g + (1 - a) * xs
    return out
