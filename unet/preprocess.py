"""From a validated 3D case to the 2D axial slices the network sees, and back.

Slice convention: ``slices[z, c] == volume_c[:, :, z]`` (H = NIfTI axis 0, W = axis 1), channels in
``flair, t1, t1ce, t2`` order. Labels become network classes 0..3 (BraTS label 4 -> class 3).

Normalization: per case, per modality z-score over brain voxels (nonzero in any modality);
background stays exactly 0.

Profiles: ``full`` keeps 240x240 slices; ``tp`` centre-crops 192x192 and halves the resolution
(2x2 mean for images, the top-left voxel of each 2x2 block for labels) -> 96x96. Inference undoes a
profile with ``restore_grid``: upsample class scores linearly, argmax, paste into the crop box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage.nifti import MODALITIES


@dataclass(frozen=True)
class Profile:
    name: str
    crop: int | None  # centre crop size in-plane, None = keep
    factor: int  # in-plane downsampling factor

    def crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of the centre crop on an h x w slice."""
        if self.crop is None:
            return 0, h, 0, w
        if self.crop > min(h, w):
            raise ValueError(f"profile {self.name}: crop {self.crop} larger than slice {h}x{w}")
        y0, x0 = (h - self.crop) // 2, (w - self.crop) // 2
        return y0, y0 + self.crop, x0, x0 + self.crop

    def slice_shape(self, h: int, w: int) -> tuple[int, int]:
        y0, y1, x0, x1 = self.crop_box(h, w)
        return (y1 - y0) // self.factor, (x1 - x0) // self.factor


PROFILES = {"full": Profile("full", None, 1), "tp": Profile("tp", 192, 2)}
BRATS_TO_CLASS = np.zeros(5, dtype=np.uint8)
BRATS_TO_CLASS[[1, 2, 4]] = [1, 2, 3]
CLASS_TO_BRATS = np.array([0, 1, 2, 4], dtype=np.uint8)


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


def normalized_slices(volumes, mask: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, list[float], list[float]]:
    """Z-score each modality over the brain -> (Z, C, X, Y) slices, background exactly 0.

    Work is confined to the brain's bounding box; brain voxels are the mask, and since voxels
    outside it are zero in every modality, sums over the box are sums over the brain.
    """
    x, y, z = mask.shape
    box = _bbox(mask)
    inside = mask[box]
    n = max(int(inside.sum()), 1)
    out = np.zeros((z, len(volumes), x, y), dtype=dtype)
    means, stds = [], []
    for c, v in enumerate(volumes):
        vb = v[box].astype(np.float32)
        flat = vb.ravel(order="K")
        mean = float(flat.sum(dtype=np.float64)) / n
        std = float(np.sqrt(max(float(np.dot(flat, flat)) / n - mean * mean, 0.0))) or 1.0
        vb -= mean
        vb *= 1.0 / std
        vb *= inside
        out[box[2], c, box[0], box[1]] = vb.transpose(2, 0, 1)
        means.append(mean)
        stds.append(std)
    return out, means, stds


def normalize(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[float], list[float]]:
    """(C, X, Y, Z) -> the same, z-scored per modality over the brain; background 0."""
    slices, means, stds = normalized_slices(image, mask)
    return slices.transpose(1, 2, 3, 0), means, stds


def apply_profile(slices: np.ndarray, profile: Profile, dtype=np.float16) -> np.ndarray:
    """(Z, C, H, W) full-grid slices -> (Z, C, h, w): centre crop, then f x f mean pooling."""
    z, c, h, w = slices.shape
    y0, y1, x0, x1 = profile.crop_box(h, w)
    f = profile.factor
    sub = slices[:, :, y0:y1, x0:x1]
    if f > 1:
        sub = sub.reshape(z, c, (y1 - y0) // f, f, (x1 - x0) // f, f).mean(axis=(3, 5))
    return np.ascontiguousarray(sub, dtype=dtype)


def to_slices(volume: np.ndarray, profile: Profile, dtype=np.float16) -> np.ndarray:
    """(C, X, Y, Z) image -> (Z, C, h, w) slices under the profile."""
    return apply_profile(np.ascontiguousarray(volume.transpose(3, 0, 1, 2)), profile, dtype)


def to_label_slices(seg: np.ndarray, profile: Profile) -> np.ndarray:
    """(X, Y, Z) BraTS labels -> (Z, h, w) uint8 classes 0..3 under the profile."""
    h, w, _ = seg.shape
    y0, y1, x0, x1 = profile.crop_box(h, w)
    f = profile.factor
    classes = BRATS_TO_CLASS[seg[y0:y1:f, x0:x1:f, :]]
    return np.ascontiguousarray(classes.transpose(2, 0, 1))


def _upsample_linear(a: np.ndarray, f: int, axis: int) -> np.ndarray:
    """Linear interpolation by an integer factor along ``axis``; sample i lands on output f*i.

    Output f*i + r (0 <= r < f) is ``(1 - r/f) * a[i] + r/f * a[i + 1]``; past the last sample
    the edge value is held.
    """
    n = a.shape[axis]
    nxt = np.take(a, np.minimum(np.arange(1, n + 1), n - 1), axis=axis)
    parts = [a if r == 0 else (1 - r / f) * a + (r / f) * nxt for r in range(f)]
    out = np.stack(parts, axis=axis + 1)  # (..., n, f, ...)
    return out.reshape(*a.shape[:axis], n * f, *a.shape[axis + 1 :])


def restore_grid(scores: np.ndarray, profile: Profile, shape: tuple[int, int, int]) -> np.ndarray:
    """(Z, K, h, w) class scores on the profile's grid -> (X, Y, Z) BraTS labels on the input grid.

    Scores (probabilities are best) are upsampled linearly before the argmax, then pasted into the
    crop box; outside the crop box is background. Geometry follows ``to_label_slices``: the network
    was trained to predict the label of the top-left voxel of each f x f block, so its output pixel
    i sits on input row ``y0 + f*i``, and the rows between two outputs are interpolated.
    """
    h, w, z = shape
    y0, y1, x0, x1 = profile.crop_box(h, w)
    f = profile.factor
    if scores.ndim != 4 or (scores.shape[0], *scores.shape[2:]) != (z, *profile.slice_shape(h, w)):
        raise ValueError(f"scores {scores.shape} do not fit profile {profile.name} on grid {shape}")
    if f > 1:
        scores = _upsample_linear(_upsample_linear(np.asarray(scores, dtype=np.float32), f, 2), f, 3)
    classes = scores.argmax(axis=1).astype(np.uint8)  # (Z, f*h, f*w)
    out = np.zeros((h, w, z), dtype=np.uint8)
    out[y0 : y0 + classes.shape[1], x0 : x0 + classes.shape[2], :] = CLASS_TO_BRATS[classes].transpose(1, 2, 0)
    return out


def preprocess_case(case, profile: Profile, dtype=np.float16) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """A validated ``storage.nifti.Case`` -> (image slices, label slices or None, case attributes)."""
    volumes = [case.volumes[m] for m in MODALITIES]
    mask = brain_mask(volumes)
    full = profile.crop is None and profile.factor == 1
    normed, means, stds = normalized_slices(volumes, mask, dtype if full else np.float32)
    slices = normed if full else apply_profile(normed, profile, dtype)
    labels = to_label_slices(case.seg, profile) if case.seg is not None else None
    y0, y1, x0, x1 = profile.crop_box(*case.shape[:2])
    brain_per_slice = mask[y0:y1, x0:x1].sum(axis=(0, 1))  # brain voxels per slice inside the crop, full res
    label_counts = np.bincount(labels.ravel(), minlength=4) if labels is not None else None
    attrs = {
        "case_id": case.files.case_id,
        "grade": case.files.grade,
        "sources": {k: str(v) for k, v in case.files.files.items()},
        "sha256": case.sha256,
        "affine": case.affine.tolist(),
        "shape": list(case.shape),
        "zooms": list(case.zooms),
        "profile": profile.name,
        "crop_box": [y0, y1, x0, x1],
        "mean": means,
        "std": stds,
        "brain_voxels": int(mask.sum()),
        "label_voxels": None if case.seg is None else {
            str(k): int(v) for k, v in zip((1, 2, 4), np.bincount(case.seg.ravel(order="K").astype(np.uint8), minlength=5)[[1, 2, 4]])
        },
        "class_voxels": None if label_counts is None else label_counts.tolist(),  # on the profile's grid
        "slice_brain": brain_per_slice.tolist(),
        "slice_tumour": (labels > 0).sum(axis=(1, 2)).tolist() if labels is not None else None,
    }
    return slices, labels, attrs
