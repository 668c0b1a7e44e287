"""How far to trust a segmentation: an estimate of its Dice per region, and a review flag with reasons.

Built from what the prediction already computes (``Evidence``, gathered batch by batch while a case
is predicted, on the network's grid, brain only), for every *view* of the case: each member of an
ensemble (a single model is one view):

* **threshold stability** ``Q``: the Dice between the region where the view's probability of it is
  above ``SURE`` and where it is above ``1 - SURE``: near 1 where the network is sure of the
  region's extent, lower where a wide rim of voxels hovers near the decision;
* **mirror agreement** ``A``: the Dice between the masks of the image and of its left-right mirror
  (the TTA pair): a segmentation that moves when the head is mirrored is a guess;
* **member agreement** ``D``: the Dice of a member's mask against the ensemble's (1 for one model).

``Q`` and ``A`` are averaged over the views, and for the enhancing tumour the score is shrunk by its
predicted volume ``v``: ``(Q + A) / 2 * v / (v + 1 ml)`` (``SMALL_ML``). A small region's Dice is
dominated by its boundary, and a network that misses most of the ET can be sure of the little it
keeps. On the out-of-fold cases of five cross-validations (leave one out) this prior lowered the ET
estimate's mean absolute error in four (mean 0.110 -> 0.095; 0.090 -> 0.095 in the fifth) at the
cost of some of its ranking (Spearman 0.87 -> 0.84 on average); WT and TC gained nothing from it,
so they keep the plain score. A view of a case no member trained on is what an
out-of-fold fold model is, so the features a cross-validation's fold models give on their held-out
cases are distributed as the ensemble's members' are on a new scan: the mapping from features to
Dice (``fit``, a least-absolute-deviations line per region on ``(Q + A) / 2``, clipped to [0, 1]:
the median Dice at a score, so the number means what it says for the typical case) is
calibrated on the out-of-fold cases and kept with the model version. ``D`` is not calibrated (no
out-of-fold case has more than one member that never saw it): it gives reasons, not the number.

The **review rule** (``choose_rule``): flag a case whose estimated WT Dice is below ``wt`` or TC
below ``tc``, the two chosen on the out-of-fold estimates to catch the most cases with a true WT
under 0.7 or TC under 0.5 while flagging ``MAX_FLAGGED`` of them (the least trusted quarter); plus plausibility: no
tumour at all, or a whole tumour far outside (below half, above twice) the volumes of the
calibration cases, where there are ``MIN_RANGE_CASES`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from unet.outputs import REGION_CLASSES, Outputs, labels_of, region_mask

SURE = 0.75  # threshold stability compares the regions of probability above SURE and above 1 - SURE
SMOOTH = 50.0  # voxels added to each Dice's numerator and denominator: an empty region sure of itself is 1
MAX_FLAGGED = 0.25  # the review rule flags this share of the calibration cases (at most; its review budget)
BAD = {"WT": 0.7, "TC": 0.5}  # a case the rule should catch: true Dice below these
DEFAULT_RULE = {"wt": 0.75, "tc": 0.6}  # where the calibration cases hold no bad case to choose on
MIN_RANGE_CASES = 10  # the whole-tumour volume check needs this many calibration cases
MEMBERS_DISAGREE = 0.8  # member agreement below this is a reason to look
SMALL_ML = {"ET": 1.0}  # region: the volume (ml) at which its score is halved (the small-structure prior)
WORDS = {"WT": "the whole tumour (edema)", "TC": "the tumour core", "ET": "the enhancing tumour"}


def _dice(overlap: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (2 * overlap + SMOOTH) / (a + b + SMOOTH)


@dataclass
class Evidence:
    """Sums over a case's slices, per region and view; ``add`` one batch at a time."""

    sums: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def _acc(self, region: str, name: str, value: torch.Tensor) -> None:
        value = value.double().cpu().numpy()
        slot = self.sums.setdefault(region, {})
        slot[name] = slot.get(name, 0) + value

    @torch.inference_mode()
    def add(
        self, views: torch.Tensor, flips: list[torch.Tensor], inside: torch.Tensor, outputs: Outputs = "classes"
    ) -> None:
        """``views``: (V, N, K, h, w) each view's TTA-mean probabilities; ``flips``: per mirror, the
        (V, N, h, w) labels of each view on it; ``inside``: (N, h, w) brain pixels; ``outputs``: how
        the labels are decided from the probabilities (``unet.outputs.labels_of``)."""
        inside = inside[None]
        labels = labels_of(views, outputs)
        combined = labels_of(views.mean(0), outputs)[None] if len(views) > 1 else labels
        for region, classes in REGION_CLASSES.items():
            p = (1 - views[:, :, 0]) if region == "WT" else sum(views[:, :, k] for k in classes)
            p = p * inside
            m = region_mask(labels, region) & inside
            e = region_mask(combined, region) & inside
            dims = (1, 2, 3)
            self._acc(region, "sure", (p > SURE).sum(dims))
            self._acc(region, "maybe", (p > 1 - SURE).sum(dims))
            self._acc(region, "m", m.sum(dims))
            self._acc(region, "me", (m & e).sum(dims))
            self._acc(region, "e", e.sum(dims))
            if len(flips) == 2:
                f0, f1 = (region_mask(f, region) & inside for f in flips)
                self._acc(region, "ff", (f0 & f1).sum(dims))
                self._acc(region, "f0", f0.sum(dims))
                self._acc(region, "f1", f1.sum(dims))

    def features(self) -> dict[str, dict[str, float]]:
        """{region: {"Q", "A", "D"}}, each the mean over views (``A`` is ``Q`` without mirror TTA)."""
        out = {}
        for region in REGION_CLASSES:
            s = self.sums.get(region)
            if not s:  # no brain slice was predicted
                out[region] = {"Q": 1.0, "A": 1.0, "D": 1.0}
                continue
            q = float(np.mean(_dice(s["sure"], s["sure"], s["maybe"])))
            a = float(np.mean(_dice(s["ff"], s["f0"], s["f1"]))) if "ff" in s else q
            d = float(np.mean(_dice(s["me"], s["m"], s["e"])))
            out[region] = {"Q": round(q, 5), "A": round(a, 5), "D": round(d, 5)}
        return out


def score(features: dict[str, dict[str, float]], region: str, volumes_ml: dict, small_ml: dict) -> float:
    """The one number per region the calibration maps to Dice: ``(Q + A) / 2``, shrunk for a small
    predicted region where ``small_ml`` names one (``SMALL_ML``)."""
    f = features[region]
    s = (f["Q"] + f["A"]) / 2
    if region in small_ml:
        v = float(volumes_ml.get(region, 0.0))
        s *= v / (v + small_ml[region])
    return s


def fit(cases: list[dict]) -> dict:
    """The calibration from cases ``{"features": …, "dice": {region: true Dice}, "WT_ml": …,
    "volumes_ml": …}`` (``WT_ml`` the truth's, ``volumes_ml`` the segmentation's): per region a line
    ``dice ~ a + b * score`` (``lines``), the whole tumour volumes seen, and the review rule chosen
    on each case's estimate by the lines of the *other* cases (leave one out): the estimates a new
    case gets, not the fitted ones, which sit closer to the truth than any new case's will."""
    calibration = {"lines": lines(cases), "small_ml": SMALL_ML, "cases": len(cases)}
    volumes = [c["WT_ml"] for c in cases if c.get("WT_ml")]
    enough = len(volumes) >= MIN_RANGE_CASES  # a range of a handful of cases says little of what is plausible
    calibration["wt_ml"] = [round(min(volumes), 2), round(max(volumes), 2)] if enough else None
    estimates = [
        estimate(c["features"], c["volumes_ml"], {**calibration, "lines": lines(cases[:i] + cases[i + 1 :])})
        for i, c in enumerate(cases)
    ]
    calibration["rule"] = choose_rule(estimates, cases)
    return calibration


def lines(cases: list[dict]) -> dict[str, dict[str, float]]:
    """Per region the line ``dice ~ a + b * score`` through the cases (``median_line``); with under 5
    cases, or no spread in the score, the identity."""
    out = {}
    for region in REGION_CLASSES:
        x = np.array([score(c["features"], region, c["volumes_ml"], SMALL_ML) for c in cases])
        y = np.array([c["dice"][region] for c in cases])
        if len(cases) >= 5 and np.ptp(x) > 1e-6:
            a, b = median_line(x, y)
            out[region] = {"a": round(a, 5), "b": round(b, 5)}
        else:
            out[region] = {"a": 0.0, "b": 1.0}
    return out


def median_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising the sum of |y - a - b x| (least absolute deviations), as the linear program
    min sum(u + v) subject to a + b x_i + u_i - v_i = y_i, u, v >= 0 (scipy's HiGHS)."""
    from scipy.optimize import linprog

    n = len(x)
    cost = np.r_[0.0, 0.0, np.ones(2 * n)]
    equal = np.c_[np.ones(n), x, np.eye(n), -np.eye(n)]
    bounds = [(None, None)] * 2 + [(0, None)] * (2 * n)
    fit = linprog(cost, A_eq=equal, b_eq=y, bounds=bounds, method="highs")
    if not fit.success:  # cannot happen for finite data; the least-squares line then
        b, a = np.polyfit(x, y, 1)
        return float(a), float(b)
    return float(fit.x[0]), float(fit.x[1])


def estimate(features: dict, volumes_ml: dict, calibration: dict | None) -> dict[str, float]:
    """The estimated Dice per region (0-1); without a calibration, the raw score. A calibration
    fitted before the small-structure prior (no ``small_ml``) is applied to the plain score it was
    fitted on."""
    small_ml = calibration.get("small_ml", {}) if calibration else SMALL_ML
    out = {}
    for region in REGION_CLASSES:
        line = (calibration or {}).get("lines", {}).get(region, {"a": 0.0, "b": 1.0})
        s = score(features, region, volumes_ml, small_ml)
        out[region] = round(float(np.clip(line["a"] + line["b"] * s, 0, 1)), 4)
    return out


def assess(features: dict, volumes_ml: dict, calibration: dict | None) -> tuple[dict[str, float], list[str]]:
    """A segmentation's estimated Dice per region and its reasons for review (none: no review)."""
    quality = estimate(features, volumes_ml, calibration)
    return quality, review(quality, features, volumes_ml, calibration)


def choose_rule(estimates: list[dict], cases: list[dict]) -> dict:
    """Thresholds on the estimated WT and TC that flag the most bad cases (``BAD``) with at most
    ``MAX_FLAGGED`` of all flagged; ties: the most flagged, then the lowest WT threshold, then the
    lowest TC threshold. Spending the whole budget leaves a margin above the bad cases' estimates for
    the cases the rule was not chosen on, and the lowest WT threshold leaves the flagging to the
    tumour core's estimate, the one that ranks cases best (Spearman about 0.9 against WT's 0.8).
    Over five cross-validations (105 out-of-fold cases, each estimated and judged by a calibration
    without it), a rule drawn tight around the bad cases (the fewest flagged) caught 10 of their 15
    bad cases, this one 14, both flagging a quarter (``benchmarks/estimate.py``)."""
    bad = [c["dice"]["WT"] < BAD["WT"] or c["dice"]["TC"] < BAD["TC"] for c in cases]
    if not any(bad):
        return {**DEFAULT_RULE, "chosen_on": 0}
    best = None
    for wt in np.arange(0.40, 0.951, 0.01):
        for tc in np.arange(0.20, 0.901, 0.01):
            flagged = [e["WT"] < wt or e["TC"] < tc for e in estimates]
            if sum(flagged) > MAX_FLAGGED * len(cases):
                continue
            caught = sum(f and b for f, b in zip(flagged, bad))
            key = (caught, sum(flagged), -wt, -tc)
            if best is None or key > best[0]:
                best = (key, {"wt": round(float(wt), 2), "tc": round(float(tc), 2)})
    return {**(best[1] if best else DEFAULT_RULE), "chosen_on": len(cases)}


def review(quality: dict, features: dict, volumes_ml: dict, calibration: dict | None) -> list[str]:
    """The reasons to look at a segmentation, in words; none: no review needed."""
    rule = (calibration or {}).get("rule", DEFAULT_RULE)
    reasons = []
    if volumes_ml["WT"] == 0:
        reasons.append("no tumour found")
    if quality["WT"] < rule["wt"]:
        reasons.append(f"whole tumour uncertain (estimated Dice {quality['WT']:.2f} < {rule['wt']})")
    if quality["TC"] < rule["tc"]:
        reasons.append(f"tumour core uncertain (estimated Dice {quality['TC']:.2f} < {rule['tc']})")
    seen = (calibration or {}).get("wt_ml")
    if seen and volumes_ml["WT"] and not seen[0] / 2 <= volumes_ml["WT"] <= seen[1] * 2:
        seen_ml = f"{seen[0]:.0f}-{seen[1]:.0f} ml"
        reasons.append(f"whole tumour of {volumes_ml['WT']:.0f} ml, far from the {seen_ml} of the training cases")
    if reasons:  # what the members and the mirror say about the flagged case
        for region in REGION_CLASSES:
            if features[region]["D"] < MEMBERS_DISAGREE:
                reasons.append(f"members disagree on {WORDS[region]} (agreement {features[region]['D']:.2f})")
            elif features[region]["A"] < MEMBERS_DISAGREE and region != "ET":
                reasons.append(
                    f"the mirrored scan gives a different {WORDS[region]} (agreement {features[region]['A']:.2f})"
                )
    return reasons


def cases_of(rows: list[dict]) -> list[dict]:
    """Scored rows (``features``, ``dice_WT`` …, ``truth_WT_ml``, ``volumes_ml``: what an out-of-fold or
    validation case records) -> the cases ``fit`` takes."""
    return [
        {
            "features": r["features"],
            "dice": {k: r[f"dice_{k}"] for k in REGION_CLASSES},
            "WT_ml": r["truth_WT_ml"],
            "volumes_ml": r["volumes_ml"],
        }
        for r in rows
    ]


def held_out(cases: list[dict]) -> list[dict]:
    """Each case's estimate and review reasons by a calibration fitted on the *other* cases (leave one
    out): how the estimate does on a case it was not fitted on. Cases as ``fit`` takes them, with
    ``volumes_ml`` (the segmentation's) for the plausibility checks."""
    out = []
    for i, case in enumerate(cases):
        calibration = fit(cases[:i] + cases[i + 1 :])
        quality, reasons = assess(case["features"], case["volumes_ml"], calibration)
        out.append({"quality": quality, "reasons": reasons})
    return out


def agreement(cases: list[dict], estimates: list[dict]) -> dict:
    """How well estimates track the true Dice: Spearman's rank correlation and the mean absolute error
    per region, the share of cases flagged, and how many of the bad ones (``BAD``) were."""
    from scipy.stats import spearmanr

    out: dict = {"cases": len(cases)}
    for region in REGION_CLASSES:
        truth = [c["dice"][region] for c in cases]
        est = [e["quality"][region] for e in estimates]
        rho = spearmanr(est, truth).statistic if len(cases) > 2 and np.ptp(truth) and np.ptp(est) else float("nan")
        out[region] = {
            "spearman": round(float(rho), 3),
            "mae": round(float(np.mean(np.abs(np.subtract(est, truth)))), 3),
        }
    bad = [c["dice"]["WT"] < BAD["WT"] or c["dice"]["TC"] < BAD["TC"] for c in cases]
    flagged = [bool(e["reasons"]) for e in estimates]
    out["flagged"] = sum(flagged)
    out["bad"] = sum(bad)
    out["bad_flagged"] = sum(f and b for f, b in zip(flagged, bad))
    return out
