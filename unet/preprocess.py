"""From a validated 3D case to the 2D axial slices the network sees, and back.

Slice convention: ``slices[z, c] == volume_c[:, :, z]`` on the canonical grid (below), channels in
``flair, t1, t1ce, t2`` order. Labels become network classes 0..3 (BraTS label 4 -> class 3).

Normalization: per case, per modality z-score over brain voxels (nonzero in any modality);
background stays exactly 0. ``tp-clip`` first clips each modality's brain voxels to their 0.5th-99.5th
percentiles (a scanner's bright vessels or fat no longer set the scale), then takes the z-score.
``tp-hist`` standardises each modality's histogram instead (Nyul & Udupa 1999, on a fixed scale): the
brain voxels' 1st, 10th, ..., 90th, 99th percentiles are mapped piecewise linearly onto a standard
normal's quantiles at the same ranks (beyond the ends, the end segments go on), so two scanners'
contrasts between the landmarks become alike too, not only their mean and spread. The scale is fixed,
not learned from training cases as Nyul's is: the two differ by one monotone map shared by every case,
and a fixed scale needs nothing kept beside the model and sees no held-out case. By site it lost to
``tp-clip`` on every region (README, "What to expect"): no recipe uses it.

Profiles: ``full`` keeps whole slices (240x240 on the BraTS grid); ``tp`` takes a 192x192 window
over the brain and halves the images' resolution (2x2 mean) -> 96x96, whatever the scan's grid;
its labels stay at the window's 1 mm (192x192); ``window`` keeps the same window at 1 mm (192x192
images: with ``TrainConfig.patch`` 96, a training step costs what a ``tp`` step costs);
``window-clip`` is ``window`` clipped as ``tp-clip`` is.

How the slices lie on the scan's own grid is ``unet.geometry``.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from storage.brats import BRATS_TO_CLASS, LABELS, MODALITIES
from storage.cases import NAMING_HELP, InvalidCase, Naming
from unet.geometry import Geometry, geometry_of


@dataclass(frozen=True)
class Profile:
    name: str
    window: int | None  # in-plane window, voxels of the 1 mm grid; None: the whole plane
    factor: int  # in-plane downsampling factor
    clip: tuple[float, float] | None = None  # brain-voxel percentiles each modality is clipped to first
    landmarks: tuple[float, ...] | None = None  # brain-voxel percentiles mapped onto a standard normal's


PROFILES = {
    "full": Profile("full", None, 1),
    "tp": Profile("tp", 192, 2),
    "window": Profile("window", 192, 1),
    "tp-clip": Profile("tp-clip", 192, 2, clip=(0.5, 99.5)),
    "window-clip": Profile("window-clip", 192, 1, clip=(0.5, 99.5)),
    "tp-hist": Profile("tp-hist", 192, 2, landmarks=(1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)),
}


class Preprocessing(BaseModel):
    """How raw scans become slices, and how cases are split by patient."""

    profile: Literal[tuple(PROFILES)] = Field(  # the names of PROFILES, written once
        "full",
        description="full: whole 240×240 slices; tp: a 192×192 window over the brain, images downsampled to 96×96; "
        "window: the same window at 1 mm; tp-clip: tp with each modality clipped to its 0.5–99.5th percentiles; "
        "window-clip: window, clipped as tp-clip; "
        "tp-hist: tp with each modality's histogram standardised (percentiles mapped onto a standard normal's)",
    )
    naming: Naming = Field("auto", description=NAMING_HELP)
    dtype: Literal["float16", "float32"] = Field("float16", description="slice dtype in the store")
    split_ratios: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="train/val/test shares of the labelled cases, by patient"
    )
    split_seed: int = Field(0, description="seed of the deterministic split")


def brain_mask(volumes) -> np.ndarray:
    """Modalities (a (C, X, Y, Z) array or a sequence of (X, Y, Z)) -> (X, Y, Z) bool: nonzero in any."""
    if all(v.dtype.kind in "iu" for v in volumes):  # integer scans: one OR pass per modality, one compare
        acc = volumes[0].copy(order="K")
        for v in volumes[1:]:
            acc |= v
        return acc != 0
    mask = np.zeros(volumes[0].shape, dtype=bool)
    for v in volumes:
        mask |= v != 0
    return mask


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """Smallest box holding every True voxel, as slices (the brain is a small part of the grid)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0))
    return tuple(box)


SLAB = 8  # axial planes processed at once: small enough to stay in the CPU's cache
TORCH_SERIAL = 32768  # torch runs an operation on fewer values than this on the calling thread (its grain size)


def normalized_slices(
    volumes,
    mask: np.ndarray,
    dtype=np.float32,
    clip: tuple[float, float] | None = None,
    landmarks: tuple[float, ...] | None = None,
) -> tuple[np.ndarray, list[float], list[float]]:
    """Z-score each modality over the brain -> (Z, C, X, Y) slices in ``dtype``, background exactly 0.

    ``clip``: percentiles (e.g. 0.5, 99.5) of each modality's brain voxels to clip them to before the
    z-score (its mean and deviation are then those of the clipped voxels). ``landmarks``: percentiles
    of each modality's brain voxels mapped onto a standard normal's (``standard_curve``) in place of
    the z-score (the mean and deviation returned are then the brain's own).

    Work is confined to the brain's bounding box; brain voxels are the mask, and since voxels
    outside it are zero in every modality, sums over the box are sums over the brain. Integer scans
    are summed exactly (int64), so the figures do not depend on the voxel order (float scans: in
    float64). The box is then scaled and cast a slab of ``SLAB`` planes at a time, in cache: the
    transposition from the scan's (X, Y) planes into the slices' memory order and the cast to
    float16 touch the box only, never the whole grid. That cast and transposition is torch's
    ``copy_``: numpy casts float32 to float16 one value at a time (~2.5 ns a value here, most of
    the normalization), torch with the CPU's conversion instructions (~0.1 ns), with the same
    rounding (IEEE round to nearest even: the same bits, ``tests/test_ingest.py``). Each copy is
    kept under ``TORCH_SERIAL`` values so that torch does it on the calling thread: its own threads
    would compete with the other workers' (measured: up to 3x slower on a busy machine).
    """
    import torch  # here: a run that normalizes nothing (every case unchanged) never imports it (1-2 s)

    x, y, z = mask.shape
    box = _bbox(mask)
    inside = mask[box]
    n = max(int(np.count_nonzero(inside)), 1)
    out = np.zeros((z, len(volumes), x, y), dtype=dtype)
    out_t = torch.from_numpy(out)  # the same memory
    rows = max(1, (TORCH_SERIAL - 1) // max(inside.shape[1], 1))  # rows of a plane per copy
    means, stds = [], []
    for c, v in enumerate(volumes):
        vb = v[box]
        brain = vb[inside] if (clip or landmarks) and inside.any() else None  # gathered once, the scan's dtype
        limits = np.percentile(brain, clip) if brain is not None and clip else None  # (sorts 16-bit values)
        curve = standard_curve(brain, landmarks) if brain is not None and landmarks else None
        if brain is not None:
            brain = brain.astype(np.float64)
            if limits is not None:
                np.clip(brain, *limits, out=brain)
            mean, std = float(brain.mean()), float(brain.std()) or 1.0
        else:
            total, squares = _moments(vb)
            mean = total / n
            std = float(np.sqrt(max(squares / n - mean * mean, 0.0))) or 1.0
        for z0 in range(0, vb.shape[2], SLAB):
            planes = slice(z0, z0 + SLAB)
            t = vb[:, :, planes].astype(np.float32)
            if curve is not None:
                t = np.interp(t, *curve).astype(np.float32)
            else:
                if limits is not None:
                    np.clip(t, *limits, out=t)
                t -= mean
                t *= 1.0 / std
            t *= inside[:, :, planes]
            tt = torch.from_numpy(t)
            for k in range(t.shape[2]):
                for r in range(0, t.shape[0], rows):
                    xs = slice(box[0].start + r, box[0].start + min(r + rows, t.shape[0]))
                    out_t[box[2].start + z0 + k, c, xs, box[1]].copy_(tt[r : r + rows, :, k])
        means.append(mean)
        stds.append(std)
    return out, means, stds


def standard_curve(brain: np.ndarray, landmarks: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(xp, fp) for ``np.interp``: the brain voxels' ``landmarks`` percentiles -> a standard normal's
    quantiles at the same ranks, each end segment carried on to the brain's minimum and maximum."""
    ranks = np.asarray(landmarks, dtype=np.float64)
    fp = np.array([NormalDist().inv_cdf(r / 100) for r in ranks])
    xp = np.maximum.accumulate(np.percentile(brain, ranks).astype(np.float64))
    span = max(float(xp[-1] - xp[0]), 1e-6)
    xp = xp + np.arange(len(xp)) * span * 1e-9  # ties (a modality zero in much of the brain): strictly rising
    low = (fp[1] - fp[0]) / max(xp[1] - xp[0], span / 100)  # slopes of the end segments, never infinite
    high = (fp[-1] - fp[-2]) / max(xp[-1] - xp[-2], span / 100)
    lo, hi = min(float(brain.min()), xp[0]) - 1.0, max(float(brain.max()), xp[-1]) + 1.0
    xp = np.concatenate([[lo], xp, [hi]])
    fp = np.concatenate([[fp[0] - (xp[1] - lo) * low], fp, [fp[-1] + (hi - xp[-2]) * high]])
    return xp, fp


def _moments(v: np.ndarray) -> tuple[float, float]:
    """(sum, sum of squares) of a volume: exact for integer voxels, float64 otherwise."""
    if v.dtype.kind in "iu" and v.dtype.itemsize <= 2:  # squares of 16-bit values fit int64 sums
        total, squares = 0, 0
        for z0 in range(0, v.shape[2], SLAB):
            slab = v[:, :, z0 : z0 + SLAB].astype(np.int64)
            total += int(slab.sum())
            squares += int(np.einsum("ijk,ijk->", slab, slab))
        return float(total), float(squares)
    flat = v.ravel(order="K").astype(np.float64)
    return float(flat.sum()), float(np.dot(flat, flat))


def downsample(slices: np.ndarray, factor: int, dtype=np.float16) -> np.ndarray:
    """(Z, C, H, W) -> (Z, C, H/f, W/f): f x f mean pooling."""
    if factor > 1:
        z, c, h, w = slices.shape
        slices = slices.reshape(z, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))
    return np.ascontiguousarray(slices, dtype=dtype)


def preprocess_case(
    case, profile: Profile, dtype=np.float16, grow: bool = False
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """A validated ``storage.nifti.Case`` -> (image slices, label slices or None, case attributes).

    ``grow``: for inference, a brain larger than the profile's window gets a larger window (every
    brain voxel predicted); for the store (``grow=False``) the window keeps its size.
    """
    volumes = [case.volumes[m] for m in MODALITIES]
    mask = brain_mask(volumes)
    try:
        geometry = geometry_of(case.affine, case.shape, case.zooms, mask, profile.window, profile.factor, grow=grow)
    except ValueError as e:  # not a brain volume: a one-line reason naming the scan's file
        raise InvalidCase(case.files.files.get("flair", case.files.case_id), str(e)) from None
    oriented = [geometry.reorient(v) for v in volumes]  # views; a no-op for BraTS's own orientation
    omask = geometry.reorient(mask)
    f = profile.factor
    final = f == 1 and not geometry.resampled  # normalized slices are the result, in its dtype: no second cast
    normed, means, stds = normalized_slices(
        oriented, omask, dtype if final else np.float32, profile.clip, profile.landmarks
    )  # (Z, C, X, Y)
    slices = downsample(geometry.window(normed, order=1), f, dtype)
    in_window, outside = _brain_in_window(geometry, omask)
    labels = None if case.seg is None else _window_classes(geometry, geometry.reorient(case.seg))
    attrs = {
        "case_id": case.files.case_id,
        "grade": case.files.grade,
        "edition": case.files.edition,
        "sources": {k: str(v) for k, v in case.files.files.items()},
        "sha256": case.sha256,
        "affine": case.affine.tolist(),
        "shape": list(case.shape),
        "zooms": list(case.zooms),
        "profile": profile.name,
        "geometry": geometry.to_dict(),
        "mean": means,
        "std": stds,
        "brain_voxels": int(np.count_nonzero(mask)),
        "brain_outside_window": outside,  # cut by the window (0 but for huge brains)
        "label_voxels": None if case.seg is None else {str(k): int(np.count_nonzero(case.seg == k)) for k in LABELS},
        "class_voxels": None if labels is None else [int(np.count_nonzero(labels == k)) for k in range(4)],
        "slice_brain": in_window,  # brain voxels per slice inside the window, full res
        "slice_tumour": None if labels is None else np.count_nonzero(labels, axis=(1, 2)).tolist(),
    }
    return slices, labels, attrs


def _brain_in_window(geometry: Geometry, omask: np.ndarray) -> tuple[list[int], int]:
    """(brain voxels per slice inside the window at full resolution, brain voxels the window cuts)."""
    if geometry.resampled:
        footprint = geometry.resample(np.ascontiguousarray(omask.transpose(2, 0, 1)), order=0)  # (Z, H, W)
        per_slice = np.count_nonzero(geometry.crop(footprint), axis=(1, 2))
        return per_slice.tolist(), int(np.count_nonzero(footprint)) - int(per_slice.sum())
    y0, y1, x0, x1 = geometry.box  # on the (H, W) = (X, Y) plane: count in place, no transposed copy
    h, w = geometry.plane
    per_slice = np.count_nonzero(omask[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)], axis=(0, 1))
    return per_slice.tolist(), int(np.count_nonzero(omask)) - int(per_slice.sum())


def _window_classes(geometry: Geometry, seg: np.ndarray) -> np.ndarray:
    """(X, Y, Z) BraTS labels on the oriented grid -> (Z, H, W) classes 0..3 in the profile's window,
    at the window's own resolution (1 mm): not downsampled with the images, since a label has no mean
    (every 2nd pixel would cap a perfect network's NCR Dice near 0.8); the loss scores the network's
    upsampled output there (``unet.loss.SegLoss``), as evaluation does.

    Classes are looked up inside the tumour's bounding box only; the rest is background."""
    classes = np.zeros(seg.shape[::-1], dtype=np.uint8).transpose(2, 1, 0)  # (X, Y, Z) view of a (Z, Y, X) array
    box = _bbox(seg)
    classes[box] = BRATS_TO_CLASS[seg[box]]
    return np.ascontiguousarray(geometry.window(classes.transpose(2, 0, 1), order=0))
