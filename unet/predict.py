"""Volume prediction: every axial slice of a case through the 2D U-Net, back to a 3D label volume.

One code path for evaluation and inference::

    slices (Z, 4, h, w) on the profile's grid          # from the slice store, or preprocess_case
      -> brain slices only, in batches                 # no brain: background, never run
      -> crop: the batch's brain box + CROP_MARGIN,    # the rest of the plane is background: not run
         on the network's 2**depth grid
      -> UNet forward (channels_last, autocast)        # valid mode: the crop's context from the
                                                       #   overlap-tile mirror padding
                                                       # (+ mirror TTA: mean with the left-right mirror)
      -> class probabilities (N, K, h, w) float32      # pasted back; pixels without brain: background
                                                       #   (unet.outputs: soft-max, or nested regions)
      -> Geometry.restore: upsample, window, spacing   # per batch, so memory stays one batch
      -> argmax (or regions painted WT -> TC -> ET), reorient
      -> (X, Y, Z) uint8 BraTS labels {0, 1, 2, 4} on the input's own grid
      -> PostProcess (below), chosen on the validation cases and kept with the model

Cropping: background is exactly 0 and labelled background whatever the network says, so a batch
runs on its slices' brain box only, widened by ``CROP_MARGIN`` pixels a side and laid on the
network's pooling grid, so it predicts what the whole plane would: exactly in valid mode (the same
mirror padding as ``UNet.predict``), and within the margin's reach of the zero padding in same mode
(``tests/test_predict_crop.py``: Dice >= 0.99 per region against the whole plane on real cases).

Precision: ``autocast_dtype(device, precision)`` as in training (``auto``: bf16 on CUDA GPUs that
have it, else fp16, and on CPUs with native bf16; fp32 elsewhere); channels_last on CPU and CUDA;
the probabilities in float32.

Slices are 2D and independent: predicting a subset (``predict_volume(..., only=[z])``) gives what
the whole volume gives there, up to float rounding and, in same mode, the crop's edge.

Post-processing (``unet.postprocess``), chosen on the validation or out-of-fold cases and kept
with the model version, is applied by the caller (``predict_case``'s ``post``).

2.5D models (``context`` k > 0) get each slice with its k neighbours either side
(``unet.data.with_context``), read from the slices as training read them. An ensemble
(``unet.ensemble``) predicts through the same path: its logits are the log of its members' mean
probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, Field

from storage.brats import LABELS, REGIONS
from unet.data import with_context
from unet.device import DEVICE_HELP, autocast_dtype
from unet.ensemble import Ensemble
from unet.geometry import Geometry, to_labels
from unet.model import UNet, centre_slice, mirror_pad
from unet.outputs import labels_of
from unet.postprocess import PostProcess
from unet.preprocess import PROFILES, Profile, preprocess_case
from unet.quality import Evidence


class Prediction(BaseModel):
    """How scans are segmented (the same for evaluation, inference and the inbox sweep)."""

    tta: bool = Field(
        True,
        description="mirror test-time augmentation: the mean with the left-right mirror (2x the compute)",
    )
    postprocess: bool = Field(
        True,
        description="apply the model's post-processing (chosen on its validation or out-of-fold cases); "
        "off: the network's raw output",
    )
    device: str = Field("auto", description=DEVICE_HELP)
    batch_size: int = Field(16, ge=1, description="slices per forward pass")


# Mirror TTA over the flips training augments with: none and left-right (H is the L-R axis). An
# anterior-posterior mirror is an anatomy the network never saw, and would only add noise.
FLIPS: tuple[tuple[int, ...], ...] = ((), (-2,))


# Pixels of context kept around the brain when cropping (at the network's grid, per side): enough that
# a same-padding network's crop agrees with its whole plane (tests/test_predict_crop.py; the margins
# measured are in the README's "Benchmarks").
CROP_MARGIN = 16


@torch.inference_mode()
def predict_plane(model: UNet, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """(N, C, h, w) slices -> (N, K, h, w) class probabilities, same h, w (any size).

    With ``tta`` the probabilities are the mean over the image and its mirrors in ``FLIPS``, each
    prediction flipped back first. The whole plane, in the model's and the input's own precision.
    """
    flips = FLIPS if tta else FLIPS[:1]
    total = None
    for dims in flips:
        xi = x.flip(dims) if dims else x
        p = model.probabilities(model.predict(xi))
        p = p.flip(dims) if dims else p
        total = p if total is None else total.add_(p)
    return total / len(flips)


def brain_slices(slices) -> np.ndarray:
    """(Z,) bool: slices with any nonzero voxel (normalization keeps the background exactly 0)."""
    return np.array([np.asarray(slices[z]).any() for z in range(slices.shape[0])], dtype=bool)


def brain_box(footprint: np.ndarray | torch.Tensor, margin: int = CROP_MARGIN) -> tuple[int, int, int, int] | None:
    """(h, w) bool footprint of the brain -> its bounding box ``(y0, y1, x0, x1)`` widened by
    ``margin`` pixels a side and kept inside the plane; None when there is no brain."""
    footprint = torch.as_tensor(footprint)
    h, w = footprint.shape
    rows, cols = torch.nonzero(footprint.any(1)).flatten(), torch.nonzero(footprint.any(0)).flatten()
    if rows.numel() == 0:
        return None
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return max(y0 - margin, 0), min(y1 + margin, h), max(x0 - margin, 0), min(x1 + margin, w)


def _tile_1d(model: UNet, n: int, lo: int, hi: int) -> tuple[int, int, int, int]:
    """One axis of a crop: image rows [lo, hi) of an ``n``-row plane -> (pad_before, pad_after, a, size).

    ``UNet.predict`` mirror-pads the plane by (pad_before, pad_after) to the network's input size and
    runs it whole; raw output row j lies over image row j - r0. The crop runs rows [a, a + size) of
    that padded plane instead: ``a`` a multiple of 2**depth (the same pooling grid), ``size`` an input
    size the network takes, whose output rows [a, a + out) cover image rows [lo, hi).
    """
    s = 2**model.cfg.depth
    full = model.input_size_for(n)
    before = (full - n) // 2
    r0 = before - (full - model.output_size(full)) // 2
    a = max((lo + r0) // s * s, 0)
    size = model.input_size_for(hi + r0 - a)
    if a + size > full:  # at the far edge: end where the whole plane ends (offsets differ by k * s)
        a = max(full - size, 0)
    if a + model.output_size(size) < hi + r0 or a + size > full:  # cannot happen; never predict less
        a, size = 0, full
    return before, full - n - before, a, size


@torch.inference_mode()
def predict_crop(
    model: UNet,
    x: torch.Tensor,
    box: tuple[int, int, int, int] | None,
    tta: bool = False,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    evidence: Evidence | None = None,
) -> torch.Tensor:
    """(N, C, h, w) slices -> (N, K, h, w) float32 probabilities, predicted on the crop holding ``box``
    (``brain_box``; None: the whole plane) only; outside the crop, background (class 0, probability 1).

    The crop is laid on the plane as ``UNet.predict`` pads it (see ``_tile_1d``), so in valid mode it
    predicts exactly what ``predict_plane`` would there. ``amp``: autocast dtype (None: the input's
    own); ``channels_last``: the crop in channels_last memory format. With ``tta`` the mean over
    ``FLIPS``: each mirror of the slices predicted on the mirrored box, and flipped back.
    ``evidence``: gathers what the quality estimate is built from (``unet.quality.Evidence``): each
    view's (an ensemble's members, or the model) probabilities and its labels on each mirror.
    """
    h, w = x.shape[-2:]
    box = (0, h, 0, w) if box is None else box
    flips = FLIPS if tta else FLIPS[:1]
    total, labels = None, []
    for dims in flips:
        xi, bi = x, box
        if -2 in dims:
            xi, bi = xi.flip(-2), (h - box[1], h - box[0], *box[2:])
        if -1 in dims:
            xi, bi = xi.flip(-1), (*bi[:2], w - box[3], w - box[2])
        p = _forward_crop(model, xi, bi, amp, channels_last)  # (views, N, K, h, w)
        p = p.flip(dims) if dims else p
        if evidence is not None:
            labels.append(labels_of(p[..., box[0] : box[1], box[2] : box[3]], model.cfg.outputs))
        total = p if total is None else total.add_(p)
    views = total.div_(len(flips))
    if evidence is not None:  # outside the box all is background, sure of itself: the box alone is exact
        y0, y1, x0, x1 = box
        inside = (centre_slice(x, model.cfg)[..., y0:y1, x0:x1] != 0).any(1)
        evidence.add(views[..., y0:y1, x0:x1], labels, inside, model.cfg.outputs)
    return views.mean(0)


def _forward_crop(
    model: UNet, x: torch.Tensor, box: tuple[int, int, int, int], amp: torch.dtype | None, channels_last: bool
) -> torch.Tensor:
    """``predict_crop`` without the mirrors: one forward of the crop, pasted into a background plane;
    (views, N, K, h, w): an ensemble's members' probabilities, or the model's as one view."""
    n, _, h, w = x.shape
    top, bottom, ay, sy = _tile_1d(model, h, box[0], box[1])
    left, right, ax, sx = _tile_1d(model, w, box[2], box[3])
    xp = mirror_pad(x, (left, right, top, bottom)) if top or bottom or left or right else x
    tile = xp[..., ay : ay + sy, ax : ax + sx]
    if channels_last:
        tile = tile.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        p = model.member_probs(tile) if isinstance(model, Ensemble) else model.probabilities(model(tile))[None]
    # the tile's output row i lies over image row i + ay - r0, with r0 = pad - (input - output) / 2
    oy = ay - top + (xp.shape[-2] - model.output_size(xp.shape[-2])) // 2
    ox = ax - left + (xp.shape[-1] - model.output_size(xp.shape[-1])) // 2
    iy0, iy1 = max(oy, 0), min(oy + p.shape[-2], h)  # the image rows and columns the output covers
    ix0, ix1 = max(ox, 0), min(ox + p.shape[-1], w)
    if (iy0, iy1, ix0, ix1) == (0, h, 0, w) and p.shape[-2:] == (h, w):
        return p
    probs = torch.zeros((p.shape[0], n, p.shape[2], h, w), dtype=torch.float32, device=x.device)
    probs[:, :, 0] = 1.0
    probs[..., iy0:iy1, ix0:ix1] = p[..., iy0 - oy : iy1 - oy, ix0 - ox : ix1 - ox]
    return probs


@torch.inference_mode()
def predict_slices(
    model: UNet,
    x: np.ndarray,
    tta: bool = False,
    device: str | torch.device | None = None,
    *,
    precision: str = "auto",
    crop: bool = True,
    channels_last: bool = True,
    evidence: Evidence | None = None,
) -> np.ndarray:
    """(N, C, h, w) normalized slices -> (N, K, h, w) float32 class probabilities; pixels where every
    channel is 0 (no brain) are background, whatever the network says. ``evidence``: see ``predict_crop``.

    ``crop``: run the network on the slices' brain box plus ``CROP_MARGIN`` only (``predict_crop``);
    off: on the whole plane. ``precision``: autocast, ``autocast_dtype`` (auto: bf16 on CUDA and on
    CPUs with native bf16). ``channels_last``: on CPU and CUDA.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    outside = (centre_slice(xt, model.cfg) == 0).all(1)  # (N, h, w); a 2.5D input's own slice
    box = brain_box((~outside).any(0)) if crop else None
    if crop and box is None:  # no brain at all: nothing to predict
        probs = torch.zeros((xt.shape[0], model.cfg.num_classes, *xt.shape[2:]), dtype=torch.float32)
        probs[:, 0] = 1.0
        return probs.numpy()
    amp = autocast_dtype(device, precision)
    probs = predict_crop(model, xt, box, tta, amp, channels_last and device.type in ("cpu", "cuda"), evidence)
    probs[:, 0].masked_fill_(outside, 1.0)
    probs[:, 1:].masked_fill_(outside[:, None], 0.0)
    return probs.cpu().numpy()


def predict_volume(
    model: UNet,
    slices,
    geometry: Geometry | dict,
    brain: Sequence[bool] | Sequence[int] | None = None,
    *,
    only: Sequence[int] | None = None,
    tta: bool = False,
    batch_size: int,
    evidence: Evidence | None = None,
    **how,
) -> np.ndarray:
    """Slices on the profile's grid -> (X, Y, Z) uint8 BraTS labels on the scan's own grid.

    ``slices``: (Z, C, h, w) numpy or Zarr array (read one batch at a time); ``geometry``: how they
    lie on the scan (``attrs["geometry"]`` of a stored or preprocessed case). ``brain``: per slice,
    truthy when it holds brain (e.g. the store's ``slice_brain`` counts); default: found from the
    slices. Slices without brain are background and never reach the network. ``only``: predict
    just these slice indices (the rest stay background). ``how``: ``predict_slices``'s ``device``,
    ``precision``, ``crop``, ``channels_last`` (the defaults are the fast path; ``precision="fp32",
    crop=False, channels_last=False`` runs the whole plane in fp32, as before cropping).
    ``evidence``: gathers what the quality estimate is built from (``unet.quality``), batch by batch.
    """
    geometry = Geometry.from_dict(geometry) if isinstance(geometry, dict) else geometry
    z = geometry.slices
    if slices.shape[0] != z or tuple(slices.shape[2:]) != geometry.slice_shape:
        raise ValueError(
            f"slices {tuple(slices.shape)} do not fit this scan's geometry ({z}, C, {geometry.slice_shape})"
        )
    keep = np.asarray(brain, dtype=bool) if brain is not None else brain_slices(slices)
    if only is not None:
        keep = keep & np.isin(np.arange(z), np.asarray(only))
    h0, w0, _ = geometry.oriented
    classes = np.zeros((h0, w0, z), dtype=np.uint8)
    todo = np.flatnonzero(keep)
    for start in range(0, todo.size, batch_size):
        idx = todo[start : start + batch_size]
        batch = with_context(slices, idx, model.cfg.context)  # one contiguous read, numpy or Zarr
        probs = predict_slices(model, batch, tta, evidence=evidence, **how)
        classes[:, :, idx] = geometry.restore(probs, model.cfg.outputs)
    return to_labels(geometry, classes)


def predict_case(
    model: UNet, case, profile: Profile | str, post: PostProcess | None = None, **kw
) -> tuple[np.ndarray, dict]:
    """A validated ``storage.nifti.Case`` -> ((X, Y, Z) BraTS labels on its grid, case attributes).

    Preprocessed exactly as ingestion does (``preprocess_case``) with the model's profile; the
    window grows to hold a brain larger than the profile's, so every brain voxel is predicted.
    """
    profile = PROFILES[profile] if isinstance(profile, str) else profile
    slices, _, attrs = preprocess_case(case, profile, dtype=np.float32, grow=True)
    labels = predict_volume(model, slices, attrs["geometry"], attrs["slice_brain"], **kw)
    if post is not None:
        labels = post.apply(labels, case.zooms)
    return labels, attrs


def volumes_ml(labels: np.ndarray, zooms: Sequence[float]) -> dict[str, float]:
    """Tumour volumes in millilitres: regions WT/TC/ET and labels L1 (NCR/NET), L2 (ED), L4 (ET)."""
    voxel_ml = float(np.prod(zooms)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=5)
    out = {region: int(counts[list(members)].sum()) for region, members in REGIONS.items()}
    out |= {f"L{label}": int(counts[label]) for label in LABELS}
    return {k: round(v * voxel_ml, 3) for k, v in out.items()}
