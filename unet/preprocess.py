"""From a validated 3D case to the 2D axial slices the network sees, and back.

Slice convention: ``slices[z, c] == volume_c[:, :, z]`` on the canonical grid (``unet.geometry``:
BraTS orientation, 1 mm in-plane, the profile's window over the brain), channels in
``flair, t1, t1ce, t2`` order. Labels become network classes 0..3 (BraTS label 4 -> class 3).

Normalization: per case, per modality z-score over brain voxels (nonzero in any modality);
background stays exactly 0.

Profiles: ``full`` keeps whole slices (240x240 on the BraTS grid); ``tp`` takes a 192x192 window
over the brain and halves the resolution (2x2 mean for images, the top-left voxel of each 2x2 block
for labels) -> 96x96, whatever the scan's grid. The case's
``Geometry`` (recorded in the store and returned to inference) undoes it all: ``to_labels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage.nifti import MODALITIES
from unet.geometry import Geometry, plan


@dataclass(frozen=True)
class Profile:
    name: str
    window: int | None  # in-plane window, voxels of the 1 mm grid; None: the whole plane
    factor: int  # in-plane downsampling factor


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
        flat = vb.ravel(order="K").astype(np.float64)  # float64 sums: the same figures in any voxel order
        mean = float(flat.sum()) / n
        std = float(np.sqrt(max(float(np.dot(flat, flat)) / n - mean * mean, 0.0))) or 1.0
        vb -= mean
        vb *= 1.0 / std
        vb *= inside
        out[box[2], c, box[0], box[1]] = vb.transpose(2, 0, 1)
        means.append(mean)
        stds.append(std)
    return out, means, stds


def downsample(slices: np.ndarray, factor: int, dtype=np.float16) -> np.ndarray:
    """(Z, C, H, W) -> (Z, C, H/f, W/f): f x f mean pooling."""
    if factor > 1:
        z, c, h, w = slices.shape
        slices = slices.reshape(z, c, h // factor, factor, w // factor, factor).mean(axis=(3, 5))
    return np.ascontiguousarray(slices, dtype=dtype)


def preprocess_case(case, profile: Profile, dtype=np.float16, grow: bool = False) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """A validated ``storage.nifti.Case`` -> (image slices, label slices or None, case attributes).

    ``grow``: for inference, a brain larger than the profile's window gets a larger window (every
    brain voxel predicted); for the store (``grow=False``) the window keeps its size.
    """
    volumes = [case.volumes[m] for m in MODALITIES]
    mask = brain_mask(volumes)
    where = case.files.files.get("flair", case.files.case_id)
    geometry = plan(case.affine, case.shape, case.zooms, mask, profile.window, profile.factor, grow=grow, where=where)
    oriented = [geometry.reorient(v) for v in volumes]  # views; a no-op for BraTS's own orientation
    omask = geometry.reorient(mask)
    normed, means, stds = normalized_slices(oriented, omask, np.float32)  # (Z, C, X, Y)
    slices = downsample(geometry.window(normed, order=1), profile.factor, dtype)
    brain = geometry.window(np.ascontiguousarray(omask.transpose(2, 0, 1)), order=0)  # (Z, window) full res
    labels = None
    if case.seg is not None:
        classes = BRATS_TO_CLASS[geometry.reorient(case.seg)].transpose(2, 0, 1)  # (Z, X, Y)
        f = profile.factor
        labels = np.ascontiguousarray(geometry.window(classes, order=0)[:, ::f, ::f])
    label_counts = np.bincount(labels.ravel(), minlength=4) if labels is not None else None
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
        "brain_voxels": int(mask.sum()),
        "brain_outside_window": geometry.outside(omask),  # brain voxels the window cut (0 but for huge brains)
        "label_voxels": None if case.seg is None else {
            str(k): int(v) for k, v in zip((1, 2, 4), np.bincount(case.seg.ravel(order="K"), minlength=5)[[1, 2, 4]])
        },
        "class_voxels": None if label_counts is None else label_counts.tolist(),  # on the profile's grid
        "slice_brain": brain.sum(axis=(1, 2)).tolist(),  # brain voxels per slice inside the window, full res
        "slice_tumour": (labels > 0).sum(axis=(1, 2)).tolist() if labels is not None else None,
    }  # fmt: skip
    return slices, labels, attrs


def to_labels(geometry: Geometry, classes: np.ndarray) -> np.ndarray:
    """(X0, Y0, Z0) network classes on the oriented input grid (``Geometry.restore``) -> (X, Y, Z) uint8
    BraTS labels {0, 1, 2, 4} on the input's own grid."""
    return CLASS_TO_BRATS[geometry.unorient(classes)]
