"""Volume prediction: every axial slice of a case through the 2D U-Net, back to a 3D label volume.

One code path for evaluation and inference::

    slices (Z, 4, h, w) on the profile's grid          # from the slice store, or preprocess_case
      -> brain slices only, in batches                 # no brain: background, never run
      -> UNet.predict (overlap-tile in valid mode)     # (+ mirror TTA: mean with the left-right mirror)
      -> softmax probabilities (N, K, h, w)            # pixels without brain: background
      -> Geometry.restore: upsample, window, spacing   # per batch, so memory stays one batch
      -> argmax, reorient -> (X, Y, Z) uint8 BraTS labels {0, 1, 2, 4} on the input's own grid
      -> PostProcess (below), chosen on the validation cases and kept with the model

Slices are 2D and independent, so predicting any subset of slices gives exactly what the whole
volume would give there (``segment(..., only=[z])`` predicts one slice for a figure).

Post-processing (``PostProcess``), chosen on the validation cases and kept with the model version:

* **connected components**: a 2D network sees one slice at a time, so bright spots far from the
  tumour (vessels, the choroid plexus, artefacts) can come out as islands of "tumour" — a few
  voxels for Dice, tens of millimetres for HD95. Islands of whole tumour smaller than
  ``min_component`` times the largest are dropped (1.0 keeps the largest only, 0 keeps all).
* **small enhancing tumour**: BraTS scores a case without enhancing tumour as ET Dice 1 only when
  none is predicted, so a few false ET voxels cost the whole case; predicted ET smaller than
  ``et_min_ml`` becomes NCR/NET (label 1), so it stays in the tumour core.

``best_postprocess`` tries the candidate values on the validation cases' predictions on their
original grids, as the test is scored, and keeps the values with the best mean Dice over WT, TC
and ET (first the components, then the ET threshold given them); near-ties go to the lower mean
HD95, then to the stronger value (nnU-Net's rule: what does not hurt on validation is applied).
Evaluation and inference apply the choice recorded in the version's ``info.json``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage

from storage.brats import LABELS, REGIONS
from storage.registry import Registry
from unet.checkpoint import load_model
from unet.metrics import dice, hd95
from unet.model import UNet
from unet.preprocess import PROFILES, Geometry, Profile, preprocess_case, to_labels

# Mirror TTA over the flips training augments with: none and left-right (H is the L-R axis). An
# anterior-posterior mirror is an anatomy the network never saw, and would only add noise.
FLIPS: tuple[tuple[int, ...], ...] = ((), (-2,))


_loading = threading.Lock()


def cached_model(models: str, version: str, device: str = "cpu") -> tuple[UNet, dict]:
    """``load_model`` once per process for (registry root, version, device); the model is shared
    read-only by every thread that predicts with it. Pass a resolved version, not "best"."""
    with _loading:  # two threads asking at once load it once
        return _load(models, version, device)


@lru_cache(maxsize=4)
def _load(models: str, version: str, device: str) -> tuple[UNet, dict]:
    return load_model(Registry(models), version, device)


@torch.inference_mode()
def predict_probs(model: UNet, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """(N, C, h, w) slices -> (N, K, h, w) class probabilities, same h, w (any size).

    With ``tta`` the probabilities are the mean over the image and its mirrors in ``FLIPS``, each
    prediction flipped back first.
    """
    flips = FLIPS if tta else FLIPS[:1]
    total = None
    for dims in flips:
        xi = x.flip(dims) if dims else x
        p = torch.softmax(model.predict(xi).float(), dim=1)
        p = p.flip(dims) if dims else p
        total = p if total is None else total.add_(p)
    return total / len(flips)


def brain_slices(slices) -> np.ndarray:
    """(Z,) bool: slices with any nonzero voxel (normalization keeps the background exactly 0)."""
    return np.array([np.asarray(slices[z]).any() for z in range(slices.shape[0])], dtype=bool)


@torch.inference_mode()
def slice_probs(model: UNet, x: np.ndarray, tta: bool = False, device: str | torch.device | None = None) -> np.ndarray:
    """(N, C, h, w) normalized slices -> (N, K, h, w) float32 class probabilities; pixels where every
    channel is 0 (no brain) are background, whatever the network says."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    probs = predict_probs(model, xt, tta)
    outside = (xt == 0).all(1)  # (N, h, w)
    probs[:, 0].masked_fill_(outside, 1.0)
    probs[:, 1:].masked_fill_(outside[:, None], 0.0)
    return probs.float().cpu().numpy()


def segment(
    model: UNet,
    slices,
    geometry: Geometry | dict,
    brain: Sequence[bool] | Sequence[int] | None = None,
    *,
    only: Sequence[int] | None = None,
    tta: bool = False,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Slices on the profile's grid -> (X, Y, Z) uint8 BraTS labels on the scan's own grid.

    ``slices``: (Z, C, h, w) numpy or Zarr array (read one batch at a time); ``geometry``: how they
    lie on the scan (``attrs["geometry"]`` of a stored or preprocessed case). ``brain``: per slice,
    truthy when it holds brain (e.g. the store's ``slice_brain`` counts); default: found from the
    slices. Slices without brain are background and never reach the network. ``only``: predict
    just these slice indices (the rest stay background).
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
        batch = np.asarray(slices[idx[0] : idx[-1] + 1])[idx - idx[0]]  # contiguous read, numpy or Zarr
        classes[:, :, idx] = geometry.restore(slice_probs(model, batch, tta, device))
    return to_labels(geometry, classes)


def segment_case(
    model: UNet, case, profile: Profile | str, post: PostProcess | None = None, **kw
) -> tuple[np.ndarray, dict]:
    """A validated ``storage.nifti.Case`` -> ((X, Y, Z) BraTS labels on its grid, case attributes).

    Preprocessed exactly as ingestion does (``preprocess_case``) with the model's profile; the
    window grows to hold a brain larger than the profile's, so every brain voxel is predicted.
    """
    profile = PROFILES[profile] if isinstance(profile, str) else profile
    slices, _, attrs = preprocess_case(case, profile, dtype=np.float32, grow=True)
    labels = segment(model, slices, attrs["geometry"], attrs["slice_brain"], **kw)
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


# ----------------------------------------------------------------------------- post-processing

MIN_COMPONENT = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)  # candidates, gentlest first
ET_MIN_ML = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)  # ml; at 1 mm, 0.1 ml is 100 voxels
DICE_TIE = 0.002  # mean Dice this close to the best counts as the best
_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: islands touching by a corner are one


@dataclass(frozen=True)
class PostProcess:
    min_component: float = 0.0  # drop whole-tumour islands smaller than this fraction of the largest
    et_min_ml: float = 0.0  # enhancing tumour smaller than this (ml) becomes NCR/NET

    @classmethod
    def from_dict(cls, d: dict | None) -> PostProcess:
        return cls(**(d or {}))

    def to_dict(self) -> dict:
        return asdict(self)

    def apply(self, labels: np.ndarray, zooms: Sequence[float]) -> np.ndarray:
        """(X, Y, Z) BraTS labels -> the same, post-processed (a new array)."""
        out = np.array(labels, dtype=np.uint8, copy=True)
        if self.min_component > 0:
            box = ndimage.find_objects((out > 0).astype(np.uint8))
            if box:
                sub = out[box[0]]  # a view: components are found inside the tumour's bounding box only
                islands, n = ndimage.label(sub > 0, structure=_FULL)
                if n > 1:
                    sizes = np.bincount(islands.ravel())[1:]
                    keep = np.concatenate([[True], sizes >= self.min_component * sizes.max()])
                    sub[~keep[islands]] = 0
        if self.et_min_ml > 0:
            et = out == 4
            if 0 < et.sum() * float(np.prod(zooms)) / 1000.0 < self.et_min_ml:
                out[et] = 1
        return out


def scores(cases: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float]]], post: PostProcess) -> tuple[float, float]:
    """(mean Dice, mean HD95 in mm) over WT, TC, ET and the cases ``(prediction, truth, zooms)`` after ``post``."""
    dices, hds = [], []
    for pred, truth, zooms in cases:
        p = post.apply(pred, zooms)
        for members in REGIONS.values():
            a, b = np.isin(p, members), np.isin(truth, members)
            dices.append(dice(a, b))
            hds.append(hd95(a, b, zooms))
    return (float(np.mean(dices)), float(np.mean(hds))) if dices else (float("nan"), float("nan"))


def best_postprocess(cases: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float]]]) -> tuple[PostProcess, list[dict]]:
    """The post-processing that scores best on ``cases``, and every candidate tried with its scores.

    Best is the highest mean Dice; candidates within ``DICE_TIE`` of it are a tie, settled by the
    lower mean HD95 (removing a far island moves Dice by a few voxels and HD95 by centimetres), then,
    as nnU-Net settles it, by the stronger value: what does not hurt on validation is applied."""
    tried: list[dict] = []
    best = PostProcess()
    for field, candidates in (("min_component", MIN_COMPONENT), ("et_min_ml", ET_MIN_ML)):
        rows = []
        for value in candidates:
            post = replace(best, **{field: value})
            mean_dice, mean_hd95 = scores(cases, post)
            rows.append((value, mean_dice, mean_hd95))
            tried.append({**post.to_dict(), "mean_dice": round(mean_dice, 5), "mean_hd95": round(mean_hd95, 3)})
        top = max(r[1] for r in rows)
        tied = [r for r in rows if r[1] >= top - DICE_TIE]
        best = replace(best, **{field: min(reversed(tied), key=lambda r: r[2])[0]})  # of equals, the strongest
    return best, tried
