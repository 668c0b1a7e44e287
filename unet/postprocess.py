"""Post-processing of a segmentation, and its choice on out-of-fold (or validation) predictions.

A 2D network sees one slice at a time, so bright spots far from the tumour (vessels, the choroid
plexus, artefacts) can come out as islands of "tumour": a few voxels for Dice, centimetres for
HD95. Two rules, each a threshold in millilitres (absolute sizes, not shares of the largest island,
so a second real tumour is never judged against the first):

* ``min_island_ml``: whole-tumour islands (26-connected) smaller than this are removed, except the
  largest island of the case: a segmentation never loses its last island.
* ``et_min_ml``: BraTS scores a case without enhancing tumour as ET Dice 1 only when none is
  predicted, so a few false ET voxels cost the whole case; predicted ET smaller than this in total
  becomes NCR/NET (label 1): it stays in the tumour core.

``best_postprocess`` is nnU-Net's rule: a candidate is kept only where it does not lower the mean
Dice (over WT, TC, ET) of the cases it is chosen on. Near-ties (``DICE_TIE``) go to the lower mean
HD95, then to the stronger value (what does not hurt is applied). Chosen on every case's
out-of-fold prediction when the model is a cross-validated ensemble, else on the validation cases.

``min_component`` (islands smaller than this share of the largest are dropped: 1.0 keeps only the
largest) is what versions chose before; it is still applied where a version recorded it, and no
longer tried: it deleted correctly found tumours next to a larger false island.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage

from storage.brats import REGIONS
from unet.metrics import dice, hd95

# candidates, gentlest first; 1 ml = 1000 voxels at 1 mm
MIN_ISLAND_ML = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
ET_MIN_ML = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
DICE_TIE = 0.002  # a mean Dice this close to the best counts as the best
_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: islands touching by a corner are one


@dataclass(frozen=True)
class PostProcess:
    min_island_ml: float = 0.0  # remove whole-tumour islands smaller than this (ml), never the largest
    et_min_ml: float = 0.0  # enhancing tumour smaller than this in total (ml) becomes NCR/NET
    min_component: float = 0.0  # (older versions) drop islands smaller than this share of the largest

    @classmethod
    def from_dict(cls, d: dict | None) -> PostProcess:
        return cls(**(d or {}))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v or k != "min_component"}

    def apply(self, labels: np.ndarray, zooms: Sequence[float]) -> np.ndarray:
        """(X, Y, Z) BraTS labels -> the same, post-processed (a new array)."""
        out = np.array(labels, dtype=np.uint8, copy=True)
        voxel_ml = float(np.prod(zooms)) / 1000.0
        if self.min_island_ml > 0 or self.min_component > 0:
            box = ndimage.find_objects((out > 0).astype(np.uint8))
            if box:
                sub = out[box[0]]  # a view: islands are found inside the tumour's bounding box only
                islands, n = ndimage.label(sub > 0, structure=_FULL)
                if n > 1:
                    sizes = np.bincount(islands.ravel())[1:]
                    keep = (sizes * voxel_ml >= self.min_island_ml) & (sizes >= self.min_component * sizes.max())
                    keep[np.argmax(sizes)] = True  # never the last island
                    sub[~np.concatenate([[True], keep])[islands]] = 0
        if self.et_min_ml > 0:
            et = out == 4
            if 0 < et.sum() * voxel_ml < self.et_min_ml:
                out[et] = 1
        return out


Scored = tuple[np.ndarray, np.ndarray, Sequence[float]]  # (prediction, truth, zooms) of one case


class _Scorer:
    """Mean Dice and mean HD95 over WT, TC, ET of the cases after a post-processing; each distinct
    output of a case is scored once (most candidates leave most cases as they are), HD95 only when asked."""

    def __init__(self, cases: Sequence[Scored]):
        self.cases, self.seen = cases, {}

    def _case(self, i: int, post: PostProcess, with_hd95: bool) -> tuple[list[float], list[float] | None]:
        pred, truth, zooms = self.cases[i]
        out = post.apply(pred, zooms)
        key = (i, hashlib.sha1(out.tobytes()).hexdigest())
        dices, hds = self.seen.get(key, (None, None))
        masks = lambda: [(np.isin(out, m), np.isin(truth, m)) for m in REGIONS.values()]  # noqa: E731
        if dices is None:
            dices = [dice(a, b) for a, b in masks()]
        if with_hd95 and hds is None:
            hds = [hd95(a, b, zooms) for a, b in masks()]
        self.seen[key] = (dices, hds)
        return dices, hds

    def __call__(self, post: PostProcess, with_hd95: bool = True) -> tuple[float, float]:
        rows = [self._case(i, post, with_hd95) for i in range(len(self.cases))]
        if not rows:
            return float("nan"), float("nan")
        mean_hd95 = float(np.mean([h for _, hds in rows for h in hds])) if with_hd95 else float("nan")
        return float(np.mean([d for dices, _ in rows for d in dices])), mean_hd95


def scores(cases: Sequence[Scored], post: PostProcess) -> tuple[float, float]:
    """(mean Dice, mean HD95 in mm) over WT, TC, ET and the cases after ``post``."""
    return _Scorer(cases)(post)


def best_postprocess(cases: Sequence[Scored]) -> tuple[PostProcess, list[dict]]:
    """The post-processing that scores best on ``cases``, and every candidate tried with its scores
    (first the island threshold, then the ET threshold given it; HD95 only of the near-ties)."""
    score, tried, best = _Scorer(cases), [], PostProcess()
    for field, candidates in (("min_island_ml", MIN_ISLAND_ML), ("et_min_ml", ET_MIN_ML)):
        rows = {value: score(replace(best, **{field: value}), with_hd95=False)[0] for value in candidates}
        top = max(rows.values())
        tied = {value: score(replace(best, **{field: value}))[1] for value, d in rows.items() if d >= top - DICE_TIE}
        for value, mean_dice in rows.items():
            hd = tied.get(value)
            tried.append(
                {
                    **replace(best, **{field: value}).to_dict(),
                    "mean_dice": round(mean_dice, 5),
                    "mean_hd95": None if hd is None else round(hd, 3),
                }
            )
        best = replace(best, **{field: min(reversed(list(tied)), key=lambda v: tied[v])})  # of equals, the strongest
    return best, tried
