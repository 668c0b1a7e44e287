"""BraTS evaluation metrics (numpy + scipy only): Dice, HD95, sensitivity, specificity.

Volumes are *label* volumes ({0, 1, 2, 4}; anything else is refused: a 3 almost always means network
classes not mapped back); regions WT = {1, 2, 4}, TC = {1, 4}, ET = {4}. Empty masks follow the
BraTS evaluation (CaPTk, the BraTS 2023 metrics) and nnU-Net's scripts: both empty -> Dice 1, HD95
0, sensitivity 1; exactly one empty -> Dice 0, HD95 ``EMPTY_HD95`` (373.13 mm), sensitivity 0.
Specificity is TN / (TN + FP) over the whole volume (1 when the truth covers it all).

HD95 is the larger of the two *directed* 95th percentiles of surface distances, as the BraTS 2023
metrics (DeepMind's ``surface-distance``) and MONAI's ``compute_hausdorff_distance(percentile=95)``
define it (MedPy pools both directions, which is never larger); the tests check it against MONAI and
brute force. A surface is ``mask & ~erosion(mask)`` with 6-connectivity, the outside counting as
background; distances come from ``distance_transform_edt`` with the voxel spacing, on the box around
both masks (exact), or from a k-d tree over the surface voxels when stray voxels make that box large.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from scipy.spatial import cKDTree

from storage.brats import LABELS, REGIONS

__all__ = [
    "REGIONS",
    "LABELS",
    "EMPTY_HD95",
    "region_mask",
    "dice",
    "hd95",
    "sensitivity",
    "specificity",
    "evaluate_case",
    "summarize",
]

#: HD95 (mm) reported when exactly one of the two masks is empty (BraTS convention).
EMPTY_HD95: float = 373.13

_VALID_LABELS: tuple[int, ...] = (0, *LABELS)
_METRIC_PREFIXES: tuple[str, ...] = ("dice", "hd95", "sens", "spec")

Spacing = Sequence[float]


# --------------------------------------------------------------------------- helpers


def _as_bool(x: ArrayLike) -> NDArray[np.bool_]:
    return np.asarray(x).astype(bool, copy=False)


def _check_pair(pred: ArrayLike, truth: ArrayLike) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    p, t = _as_bool(pred), _as_bool(truth)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: pred {p.shape} vs truth {t.shape}")
    return p, t


def _check_spacing(spacing: Spacing, ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim:
        raise ValueError(f"spacing has {len(sp)} entries but the arrays are {ndim}-D")
    if not all(s > 0 and math.isfinite(s) for s in sp):
        raise ValueError(f"spacing must be positive and finite, got {sp}")
    return sp


def _bbox_slices(mask: NDArray[np.bool_], margin: int = 1) -> tuple[slice, ...] | None:
    """Bounding box of ``mask`` grown by ``margin`` (clipped), or None if empty."""
    slices: list[slice] = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other)) if other else np.flatnonzero(mask)
        if hit.size == 0:
            return None
        lo = max(int(hit[0]) - margin, 0)
        hi = min(int(hit[-1]) + 1 + margin, mask.shape[axis])
        slices.append(slice(lo, hi))
    return tuple(slices)


def _surface(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Surface voxels: ``mask & ~binary_erosion(mask, connectivity-1, border_value=0)``.

    Implemented with shifted views of a zero-padded copy, which is equivalent to
    ``scipy.ndimage.binary_erosion`` with ``generate_binary_structure(ndim, 1)``
    but several times faster.
    """
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    interior = mask.copy()
    for axis in range(mask.ndim):
        for shift in (slice(0, -2), slice(2, None)):
            idx = list(core)
            idx[axis] = shift
            interior &= padded[tuple(idx)]
    return mask & ~interior


def _counts(p: NDArray[np.bool_], t: NDArray[np.bool_]) -> tuple[int, int, int]:
    """(TP, |pred|, |truth|)."""
    return int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t))


def _dice_from_counts(tp: int, n_pred: int, n_truth: int) -> float:
    if n_pred + n_truth == 0:
        return 1.0
    return 2.0 * tp / (n_pred + n_truth)


def _sens_from_counts(tp: int, n_pred: int, n_truth: int) -> float:
    if n_truth == 0:
        return 1.0 if n_pred == 0 else 0.0
    return tp / n_truth


def _spec_from_counts(tp: int, n_pred: int, n_truth: int, n_total: int) -> float:
    negatives = n_total - n_truth  # TN + FP
    if negatives == 0:
        return 1.0
    fp = n_pred - tp
    return (negatives - fp) / negatives


_KDTREE_RATIO = 16
"""``method="auto"`` switches from the distance transform to a KD-tree once the
cropped box holds more than this many voxels per surface voxel (a few stray
voxels far from the tumour stretch the box to most of the volume)."""


def _directed_distances(
    sa: NDArray[np.bool_], sb: NDArray[np.bool_], sp: tuple[float, ...], method: str
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Distances surface A -> nearest surface B and B -> A (same values either way)."""
    if method == "auto":
        n_surface = int(np.count_nonzero(sa)) + int(np.count_nonzero(sb))
        method = "kdtree" if sa.size > _KDTREE_RATIO * n_surface else "edt"
    if method == "edt":
        d_ab = ndimage.distance_transform_edt(~sb, sampling=sp)[sa]
        d_ba = ndimage.distance_transform_edt(~sa, sampling=sp)[sb]
    elif method == "kdtree":
        scale = np.asarray(sp, dtype=np.float64)
        pa = np.argwhere(sa) * scale
        pb = np.argwhere(sb) * scale
        d_ab = cKDTree(pb).query(pa, k=1)[0]
        d_ba = cKDTree(pa).query(pb, k=1)[0]
    else:
        raise ValueError(f"unknown method {method!r}; expected 'auto', 'edt' or 'kdtree'")
    return np.asarray(d_ab, dtype=np.float64), np.asarray(d_ba, dtype=np.float64)


def _hd95_impl(p: NDArray[np.bool_], t: NDArray[np.bool_], sp: tuple[float, ...], method: str = "auto") -> float:
    any_p, any_t = bool(p.any()), bool(t.any())
    if not any_p and not any_t:
        return 0.0
    if not any_p or not any_t:
        return EMPTY_HD95
    box = _bbox_slices(p | t, margin=1)
    assert box is not None
    p, t = p[box], t[box]
    d_pt, d_tp = _directed_distances(_surface(p), _surface(t), sp, method)
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


# --------------------------------------------------------------------------- public API


def region_mask(labels: ArrayLike, region: str) -> NDArray[np.bool_]:
    """Boolean mask of a BraTS region (``"WT"``, ``"TC"``, ``"ET"``) in *label* space."""
    try:
        members = REGIONS[region]
    except KeyError:
        raise KeyError(f"unknown region {region!r}; expected one of {sorted(REGIONS)}") from None
    return np.isin(np.asarray(labels), members)


def dice(pred: ArrayLike, truth: ArrayLike) -> float:
    """Dice = 2|P∩T| / (|P| + |T|).  Both empty -> 1.0; exactly one empty -> 0.0."""
    p, t = _check_pair(pred, truth)
    return _dice_from_counts(*_counts(p, t))


def hd95(
    pred: ArrayLike,
    truth: ArrayLike,
    spacing: Spacing = (1.0, 1.0, 1.0),
    *,
    method: Literal["auto", "edt", "kdtree"] = "auto",
) -> float:
    """95th-percentile Hausdorff distance: the larger directed 95th percentile (see module docstring).

    Both empty -> 0.0; exactly one empty -> :data:`EMPTY_HD95` (373.13).
    ``spacing`` gives the voxel size per axis (NIfTI zooms); its length must
    equal the number of array dimensions.

    ``method`` only chooses how the (identical) nearest-surface distances are
    found: ``"edt"`` always uses ``scipy.ndimage.distance_transform_edt`` on the
    cropped box, ``"kdtree"`` a ``scipy.spatial.cKDTree`` over the surface voxel
    coordinates (scaled by ``spacing``), ``"auto"`` picks the cheaper one.
    """
    if method not in ("auto", "edt", "kdtree"):
        raise ValueError(f"unknown method {method!r}; expected 'auto', 'edt' or 'kdtree'")
    p, t = _check_pair(pred, truth)
    sp = _check_spacing(spacing, p.ndim)
    return _hd95_impl(p, t, sp, method)


def sensitivity(pred: ArrayLike, truth: ArrayLike) -> float:
    """TP / (TP + FN).  Empty truth -> 1.0 if pred is empty too, else 0.0 (BraTS/GaNDLF)."""
    p, t = _check_pair(pred, truth)
    return _sens_from_counts(*_counts(p, t))


def specificity(pred: ArrayLike, truth: ArrayLike) -> float:
    """TN / (TN + FP) over the whole array.  No negatives in truth -> 1.0."""
    p, t = _check_pair(pred, truth)
    return _spec_from_counts(*_counts(p, t), n_total=p.size)


def evaluate_case(
    pred_labels: ArrayLike,
    truth_labels: ArrayLike,
    spacing: Spacing = (1.0, 1.0, 1.0),
) -> dict[str, float]:
    """All metrics for one case, as a flat ``{name: float}`` dict.

    Both inputs are *label* volumes (values in {0, 1, 2, 4}; anything else
    raises ``ValueError``).  Keys, in this order::

        dice_WT dice_TC dice_ET  hd95_WT hd95_TC hd95_ET
        sens_WT sens_TC sens_ET  spec_WT spec_TC spec_ET
        dice_L1 dice_L2 dice_L4  hd95_L1 hd95_L2 hd95_L4
        sens_L1 sens_L2 sens_L4  spec_L1 spec_L2 spec_L4

    Both volumes are cropped once to the bounding box of all tumour voxels in
    either of them; specificity still counts true negatives over the whole
    volume.
    """
    pred = np.asarray(pred_labels)
    truth = np.asarray(truth_labels)
    if pred.shape != truth.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs truth {truth.shape}")
    sp = _check_spacing(spacing, pred.ndim)
    n_total = int(pred.size)

    # Crop once to every non-zero voxel of either volume (so invalid values are
    # still seen below); if both are all background, keep a zero-size view.
    box = _bbox_slices((pred != 0) | (truth != 0), margin=1)
    if box is None:
        box = tuple(slice(0, 0) for _ in pred.shape)
    pred, truth = pred[box], truth[box]

    for name, arr in (("pred_labels", pred), ("truth_labels", truth)):
        bad = ~np.isin(arr, _VALID_LABELS)
        if bad.any():
            values = sorted({v.item() for v in np.unique(arr[bad])})
            raise ValueError(
                f"{name} contains values {values} outside the BraTS labels {list(_VALID_LABELS)} "
                "(network class 3 must be mapped to label 4 first)"
            )

    masks: dict[str, tuple[NDArray[np.bool_], NDArray[np.bool_]]] = {}
    for region, members in REGIONS.items():
        masks[region] = (np.isin(pred, members), np.isin(truth, members))
    for label in LABELS:
        masks[f"L{label}"] = (pred == label, truth == label)

    per: dict[str, dict[str, float]] = {m: {} for m in _METRIC_PREFIXES}
    for key, (p, t) in masks.items():
        counts = _counts(p, t)
        per["dice"][key] = _dice_from_counts(*counts)
        per["hd95"][key] = _hd95_impl(p, t, sp)
        per["sens"][key] = _sens_from_counts(*counts)
        per["spec"][key] = _spec_from_counts(*counts, n_total=n_total)

    out: dict[str, float] = {}
    for group in (tuple(REGIONS), tuple(f"L{label}" for label in LABELS)):
        for metric in _METRIC_PREFIXES:
            for key in group:
                out[f"{metric}_{key}"] = float(per[metric][key])
    return out


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-metric statistics over cases: ``{metric: {mean, median, std, min, max}}``.

    NaN values (and metrics missing from some rows) are ignored; a metric with
    no finite-or-infinite value at all gets NaN statistics.  ``std`` is the
    population standard deviation (ddof=0).  Non-numeric values (e.g. a
    ``case_id`` string) and booleans are skipped, so rows may carry identifiers.
    Metrics appear in first-seen order.
    """
    values: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                continue
            values.setdefault(key, []).append(float(value))

    out: dict[str, dict[str, float]] = {}
    for key, vals in values.items():
        arr = np.asarray(vals, dtype=float)
        arr = arr[~np.isnan(arr)]
        if arr.size == 0:
            nan = float("nan")
            out[key] = {"mean": nan, "median": nan, "std": nan, "min": nan, "max": nan}
            continue
        out[key] = {
            "mean": float(np.mean(arr)),
            "median": float(np.median(arr)),
            "std": float(np.std(arr)),
            "min": float(np.min(arr)),
            "max": float(np.max(arr)),
        }
    return out
