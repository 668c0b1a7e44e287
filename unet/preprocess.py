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


def brain_mask(image: np.ndarray) -> np.ndarray:
    """(4, X, Y, Z) -> (X, Y, Z) bool: nonzero in any modality."""
    return np.any(image != 0, axis=0)


def normalize(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[float], list[float]]:
    """Z-score each modality over the brain, in place; background 0. Returns (image, means, stds)."""
    means, stds = [], []
    for c in range(image.shape[0]):
        v = image[c]
        brain = v[mask]
        mean, std = float(brain.mean()), float(brain.std())
        std = std if std > 0 else 1.0
        v -= mean
        v /= std
        v[~mask] = 0
        means.append(mean)
        stds.append(std)
    return image, means, stds


def to_slices(volume: np.ndarray, profile: Profile, dtype=np.float16) -> np.ndarray:
    """(C, X, Y, Z) image -> (Z, C, h, w) slices under the profile."""
    c, h, w, z = volume.shape
    y0, y1, x0, x1 = profile.crop_box(h, w)
    f = profile.factor
    sub = volume[:, y0:y1, x0:x1, :]
    if f > 1:
        sub = sub.reshape(c, (y1 - y0) // f, f, (x1 - x0) // f, f, z).mean(axis=(2, 4))
    out = np.empty((z, c, *sub.shape[1:3]), dtype=dtype)
    for ch in range(c):
        out[:, ch] = sub[ch].transpose(2, 0, 1)
    return out


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
    mask = brain_mask(case.image)
    image, means, stds = normalize(case.image, mask)
    slices = to_slices(image, profile, dtype)
    labels = to_label_slices(case.seg, profile) if case.seg is not None else None
    brain_slices = to_slices(mask[None].astype(np.float32), profile, np.float32)[:, 0]
    attrs = {
        "case_id": case.files.case_id,
        "grade": case.files.grade,
        "sources": {k: str(v) for k, v in case.files.files.items()},
        "sha256": case.sha256,
        "affine": case.affine.tolist(),
        "shape": list(case.image.shape[1:]),
        "zooms": list(case.zooms),
        "profile": profile.name,
        "crop_box": list(profile.crop_box(*case.image.shape[1:3])),
        "mean": means,
        "std": stds,
        "brain_voxels": int(mask.sum()),
        "label_voxels": {str(k): int(v) for k, v in zip((1, 2, 4), np.bincount(case.seg.ravel().astype(np.uint16), minlength=5)[[1, 2, 4]])}
        if case.seg is not None
        else None,
        "slice_brain": (brain_slices > 0).sum(axis=(1, 2)).tolist(),
        "slice_tumour": (labels > 0).sum(axis=(1, 2)).tolist() if labels is not None else None,
    }
    return slices, labels, attrs
