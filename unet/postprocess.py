"""Post-processing of a predicted label volume: chosen on the validation cases, kept with the model.

Two steps, each a fix for what a slice-wise network gets wrong on real scans:

* **connected components**: a 2D network sees one slice at a time, so bright spots far from the
  tumour (vessels, the choroid plexus, artefacts) can come out as islands of "tumour" — a few
  voxels for Dice, tens of millimetres for HD95. Islands of whole tumour smaller than
  ``min_component`` times the largest are dropped (1.0 keeps the largest only, 0 keeps all).
* **small enhancing tumour**: BraTS scores a case without enhancing tumour as ET Dice 1 only when
  none is predicted, so a few false ET voxels cost the whole case; predicted ET smaller than
  ``et_min_ml`` becomes NCR/NET (label 1), so it stays in the tumour core.

Brain masking comes first, in ``unet.predict``: a pixel without brain is background.

``choose`` tries the candidate values on the validation cases' predictions on their original
grids, as the test is scored, and keeps the values with the best mean Dice over WT, TC and ET
(first the components, then the ET threshold given them); a tie keeps the gentler value. The
choice is recorded in the model version's ``info.json`` and applied by evaluation and inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage

from unet.metrics import REGIONS, dice

MIN_COMPONENT = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)  # candidates, gentlest first
ET_MIN_ML = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)  # ml; at 1 mm, 0.1 ml is 100 voxels
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


def mean_dice(cases: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float]]], post: PostProcess) -> float:
    """Mean Dice over WT, TC, ET and the cases ``(prediction, truth, zooms)`` after ``post``."""
    scores = []
    for pred, truth, zooms in cases:
        p = post.apply(pred, zooms)
        scores += [dice(np.isin(p, m), np.isin(truth, m)) for m in REGIONS.values()]
    return float(np.mean(scores)) if scores else float("nan")


def choose(cases: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float]]]) -> tuple[PostProcess, list[dict]]:
    """The post-processing with the best mean Dice on ``cases``, and every candidate tried with its score."""
    tried: list[dict] = []
    best = PostProcess()
    for field, candidates in (("min_component", MIN_COMPONENT), ("et_min_ml", ET_MIN_ML)):
        scores = []
        for value in candidates:
            post = replace(best, **{field: value})
            scores.append(mean_dice(cases, post))
            tried.append({**post.to_dict(), "mean_dice": round(scores[-1], 5)})
        best = replace(best, **{field: candidates[int(np.argmax(scores))]})  # first of the best: the gentlest
    return best, tried
