"""Tests for unet.metrics: hand-computed expectations on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from unet.metrics import (
    EMPTY_HD95,
    REGIONS,
    _surface,  # noqa: PLC2701 - checked against scipy's erosion
    dice,
    evaluate_case,
    hd95,
    region_mask,
    sensitivity,
    specificity,
    summarize,
)

METHODS = ("auto", "edt", "kdtree")


def _vol(shape=(9, 9, 9)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def _brute_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """HD95 (max of the directed 95th percentiles) by explicit pairwise distances between surface voxels."""
    st = ndimage.generate_binary_structure(a.ndim, 1)
    sa = a & ~ndimage.binary_erosion(a, structure=st, border_value=0)
    sb = b & ~ndimage.binary_erosion(b, structure=st, border_value=0)
    pa = np.argwhere(sa) * np.asarray(spacing, float)
    pb = np.argwhere(sb) * np.asarray(spacing, float)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95)))


# --------------------------------------------------------------------------- dice


def test_dice_known_overlap():
    pred = np.array([1, 1, 0, 0], bool)
    truth = np.array([1, 1, 1, 0], bool)
    # 2*2 / (2 + 3)
    assert dice(pred, truth) == pytest.approx(4 / 5)
    pred = np.array([[1, 1, 1], [0, 0, 0]], bool)
    truth = np.array([[0, 1, 1], [0, 0, 1]], bool)
    assert dice(pred, truth) == pytest.approx(2 * 2 / 6)  # 2 of 3 voxels -> 2/3


def test_dice_empty_conventions():
    z = np.zeros((3, 3), bool)
    o = z.copy()
    o[1, 1] = True
    assert dice(z, z) == 1.0
    assert dice(o, z) == 0.0
    assert dice(z, o) == 0.0
    assert dice(o, o) == 1.0


def test_dice_accepts_int_arrays_and_rejects_shape_mismatch():
    assert dice(np.array([0, 3, 5]), np.array([0, 1, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        dice(np.zeros(3, bool), np.zeros(4, bool))


# --------------------------------------------------------------------------- hd95


@pytest.mark.parametrize("method", METHODS)
def test_hd95_single_voxels(method):
    a, b = _vol(), _vol()
    a[2, 4, 4] = True
    b[5, 4, 4] = True
    assert hd95(a, b, method=method) == pytest.approx(3.0)
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0), method=method) == pytest.approx(6.0)
    # spacing on another axis does not matter for an axis-0 offset
    assert hd95(a, b, spacing=(1.0, 3.0, 0.5), method=method) == pytest.approx(3.0)


@pytest.mark.parametrize("method", METHODS)
def test_hd95_diagonal_offset_anisotropic(method):
    a, b = _vol(), _vol()
    a[1, 1, 1] = True
    b[4, 5, 1] = True  # offsets (3, 4, 0)
    assert hd95(a, b, method=method) == pytest.approx(5.0)
    assert hd95(a, b, spacing=(1.0, 0.5, 7.0), method=method) == pytest.approx(math.hypot(3.0, 2.0))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_hd95_shifted_cube(method, k):
    a = np.zeros((16, 12, 12), bool)
    a[3:8, 3:8, 3:8] = True
    b = np.roll(a, k, axis=0)
    assert hd95(a, b, method=method) == pytest.approx(float(k))
    assert hd95(b, a, method=method) == pytest.approx(float(k))
    assert hd95(a, b, spacing=(1.5, 1.0, 1.0), method=method) == pytest.approx(1.5 * k)


def test_hd95_identical_and_empty():
    a = _vol()
    a[2:5, 3:6, 1:7] = True
    assert hd95(a, a) == 0.0
    z = _vol()
    assert hd95(z, z) == 0.0
    assert hd95(a, z) == EMPTY_HD95 == 373.13
    assert hd95(z, a) == EMPTY_HD95


def test_hd95_is_max_of_directed_percentiles_not_pooled():
    # A: one voxel at x=0. B: voxels x=0..10 on a line. d(A->B) = [0]; d(B->A) = 0..10.
    a = np.zeros((1, 11, 1), bool)
    b = np.zeros((1, 11, 1), bool)
    a[0, 0, 0] = True
    b[0, :, 0] = True
    # percentile(0..10, 95) = 9.5 (linear); pooled [0, 0..10] would give 9.45
    assert hd95(a, b) == pytest.approx(9.5)
    assert hd95(b, a) == pytest.approx(9.5)


def test_hd95_masks_touching_array_border():
    # Surface must include voxels on the edge of the array (border_value=0).
    a = np.zeros((6, 6, 6), bool)
    a[:, :, :] = True
    b = a.copy()
    b[0] = False
    # surface of a includes the whole face x=0; nearest surface voxel of b is 1 away
    assert hd95(a, b) == pytest.approx(_brute_hd95(a, b, (1, 1, 1)))
    assert hd95(a, b) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 0.7, 1.3)])
def test_hd95_matches_brute_force_on_random_masks(seed, spacing):
    rng = np.random.default_rng(seed)
    shape = (18, 15, 12)
    a = ndimage.binary_opening(rng.random(shape) < 0.5, iterations=1)
    b = ndimage.binary_opening(rng.random(shape) < 0.5, iterations=1)
    # confine to sub-boxes so that cropping actually removes something
    a[:4], a[:, -3:] = False, False
    b[-5:], b[:, :2] = False, False
    assert a.any() and b.any()
    expected = _brute_hd95(a, b, spacing)
    for method in METHODS:
        assert hd95(a, b, spacing=spacing, method=method) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_hd95_cropped_equals_uncropped_in_big_volume():
    rng = np.random.default_rng(3)
    small_a = rng.random((7, 6, 5)) < 0.6
    small_b = rng.random((7, 6, 5)) < 0.6
    expected = _brute_hd95(small_a, small_b, (1.0, 1.2, 0.8))
    big_a, big_b = np.zeros((40, 30, 25), bool), np.zeros((40, 30, 25), bool)
    big_a[20:27, 10:16, 3:8] = small_a
    big_b[20:27, 10:16, 3:8] = small_b
    for method in METHODS:
        assert hd95(big_a, big_b, (1.0, 1.2, 0.8), method=method) == pytest.approx(expected)


def test_hd95_2d_and_spacing_validation():
    a = np.zeros((5, 5), bool)
    b = np.zeros((5, 5), bool)
    a[0, 0] = True
    b[0, 4] = True
    assert hd95(a, b, spacing=(1.0, 0.5)) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        hd95(a, b)  # default spacing is 3-D
    with pytest.raises(ValueError):
        hd95(a, b, spacing=(1.0, 0.0))
    with pytest.raises(ValueError):
        hd95(a, b, spacing=(1.0, 1.0), method="nope")


def test_surface_matches_scipy_erosion():
    rng = np.random.default_rng(4)
    m = rng.random((10, 9, 8)) < 0.7
    st = ndimage.generate_binary_structure(3, 1)
    expected = m & ~ndimage.binary_erosion(m, structure=st, border_value=0)
    np.testing.assert_array_equal(_surface(m), expected)


# --------------------------------------------------------------------------- regions


def test_region_mask():
    labels = np.array([0, 1, 2, 4, 4, 2, 0])
    np.testing.assert_array_equal(region_mask(labels, "WT"), [0, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(region_mask(labels, "TC"), [0, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(region_mask(labels, "ET"), [0, 0, 0, 1, 1, 0, 0])
    assert region_mask(labels, "ET").dtype == bool
    assert REGIONS == {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
    with pytest.raises(KeyError):
        region_mask(labels, "XX")


# --------------------------------------------------------------------------- sensitivity / specificity


def test_sensitivity_specificity_hand_values():
    # 10 voxels: truth positives at 0..3, pred positives at 2..5
    truth = np.zeros(10, bool)
    pred = np.zeros(10, bool)
    truth[0:4] = True
    pred[2:6] = True
    # TP=2 FN=2 FP=2 TN=4
    assert sensitivity(pred, truth) == pytest.approx(2 / 4)
    assert specificity(pred, truth) == pytest.approx(4 / 6)


def test_sensitivity_specificity_empty_conventions():
    z = np.zeros(5, bool)
    o = z.copy()
    o[1] = True
    # truth empty
    assert sensitivity(z, z) == 1.0
    assert sensitivity(o, z) == 0.0
    assert specificity(z, z) == 1.0
    assert specificity(o, z) == pytest.approx(4 / 5)
    # pred empty, truth not
    assert sensitivity(z, o) == 0.0
    assert specificity(z, o) == 1.0
    # truth fills the whole array: no negatives -> 1.0
    full = np.ones(5, bool)
    assert specificity(full, full) == 1.0
    assert specificity(z, full) == 1.0


# --------------------------------------------------------------------------- evaluate_case


def _case_pair() -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[5:15, 5:15, 5:15] = 2  # edema shell
    truth[7:13, 7:13, 7:13] = 1  # necrosis
    truth[8:12, 8:12, 8:12] = 4  # enhancing
    pred = np.roll(truth, 1, axis=0)
    return pred, truth


def test_evaluate_case_keys_and_values():
    pred, truth = _case_pair()
    res = evaluate_case(pred, truth, spacing=(1.0, 1.0, 1.0))
    expected_keys = [
        f"{m}_{k}"
        for group in (("WT", "TC", "ET"), ("L1", "L2", "L4"))
        for m in ("dice", "hd95", "sens", "spec")
        for k in group
    ]
    assert list(res) == expected_keys
    assert all(isinstance(v, float) for v in res.values())
    # a 10^3 cube shifted by one voxel: overlap 9*10*10
    assert res["dice_WT"] == pytest.approx(2 * 900 / 2000)
    assert res["hd95_WT"] == pytest.approx(1.0)
    assert res["sens_WT"] == pytest.approx(0.9)
    assert res["spec_WT"] == pytest.approx((8000 - 1000 - 100) / (8000 - 1000))
    # ET: 4^3 cube shifted by one -> overlap 3*4*4 = 48 of 64
    assert res["dice_ET"] == pytest.approx(48 / 64)
    assert res["dice_L4"] == res["dice_ET"]
    assert res["hd95_TC"] == pytest.approx(1.0)
    # consistent with the single-mask functions
    assert res["dice_L2"] == pytest.approx(dice(pred == 2, truth == 2))
    assert res["hd95_L1"] == pytest.approx(hd95(pred == 1, truth == 1))
    assert res["spec_L1"] == pytest.approx(specificity(pred == 1, truth == 1))
    assert res["sens_TC"] == pytest.approx(sensitivity(region_mask(pred, "TC"), region_mask(truth, "TC")))


def test_evaluate_case_anisotropic_and_empty_regions():
    pred, truth = _case_pair()
    res = evaluate_case(pred, truth, spacing=(2.5, 1.0, 1.0))
    assert res["hd95_WT"] == pytest.approx(2.5)
    # no ET in prediction
    pred_no_et = np.where(pred == 4, 1, pred).astype(np.uint8)
    res = evaluate_case(pred_no_et, truth)
    assert res["dice_ET"] == 0.0
    assert res["hd95_ET"] == EMPTY_HD95
    assert res["sens_ET"] == 0.0
    assert res["spec_ET"] == 1.0
    # nothing anywhere
    z = np.zeros((6, 6, 6), np.uint8)
    res = evaluate_case(z, z)
    assert all(res[f"dice_{k}"] == 1.0 for k in ("WT", "TC", "ET", "L1", "L2", "L4"))
    assert all(res[f"hd95_{k}"] == 0.0 for k in ("WT", "TC", "ET", "L1", "L2", "L4"))
    assert all(res[f"spec_{k}"] == 1.0 for k in ("WT", "TC", "ET"))


def test_evaluate_case_rejects_class_space_and_bad_shapes():
    pred, truth = _case_pair()
    with pytest.raises(ValueError, match="label 4"):
        evaluate_case(np.where(pred == 4, 3, pred), truth)
    with pytest.raises(ValueError):
        evaluate_case(pred[:-1], truth)
    with pytest.raises(ValueError):
        evaluate_case(pred, truth, spacing=(1.0, 1.0))


# --------------------------------------------------------------------------- summarize


def test_summarize():
    rows = [
        {"case_id": "a", "dice_WT": 0.5, "hd95_WT": 2.0},
        {"case_id": "b", "dice_WT": 0.7, "hd95_WT": float("nan")},
        {"case_id": "c", "dice_WT": 0.9, "hd95_WT": 4.0},
        {"case_id": "d", "dice_WT": 1.0, "hd95_WT": 6.0},
    ]
    s = summarize(rows)
    assert list(s) == ["dice_WT", "hd95_WT"]
    d = s["dice_WT"]
    assert d["mean"] == pytest.approx(0.775)
    assert d["median"] == pytest.approx(0.8)
    assert d["std"] == pytest.approx(math.sqrt((0.275**2 + 0.075**2 + 0.125**2 + 0.225**2) / 4))
    assert d["min"] == pytest.approx(0.5)
    assert d["max"] == pytest.approx(1.0)
    h = s["hd95_WT"]  # NaN ignored
    assert h["mean"] == pytest.approx(4.0)
    assert h["median"] == pytest.approx(4.0)
    assert h["std"] == pytest.approx(math.sqrt(8 / 3))
    assert (h["min"], h["max"]) == (2.0, 6.0)
    all_nan = summarize([{"x": float("nan")}])["x"]
    assert set(all_nan) == {"mean", "median", "std", "min", "max"}
    assert all(math.isnan(v) for v in all_nan.values())
    assert summarize([]) == {}


# --------------------------------------------------------------------------- HD95 against MONAI


def _blobs(seed: int, shape=(40, 50, 30)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = ndimage.binary_dilation(rng.random(shape) > 0.999, iterations=3)
    b = ndimage.binary_dilation(rng.random(shape) > 0.999, iterations=2)
    if seed % 2:
        a[:5, :5, :] = True  # touching the border: its surface is there
    return a, b


@pytest.mark.parametrize(
    "seed,spacing", [(0, (1.0, 1.0, 1.0)), (1, (1.0, 1.0, 1.0)), (2, (0.9, 1.2, 2.5)), (3, (0.9, 1.2, 2.5))]
)
def test_hd95_equals_monai_and_is_not_medpy_pooled_percentile(seed, spacing):
    """Same figure as an independent implementation (MONAI's, the max of the two directed 95th
    percentiles, as BraTS 2023's surface-distance); MedPy's pooled percentile is a different number."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    a, b = _blobs(seed)
    ta, tb = (torch.from_numpy(m)[None, None].float() for m in (a, b))
    theirs = compute_hausdorff_distance(ta, tb, percentile=95, spacing=spacing).item()
    assert hd95(a, b, spacing) == pytest.approx(theirs, abs=1e-4)
    st = ndimage.generate_binary_structure(3, 1)
    sa, sb = (m & ~ndimage.binary_erosion(m, st, border_value=0) for m in (a, b))
    d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    pooled = float(np.percentile(np.concatenate([d_ab, d_ba]), 95))  # MedPy's hd95
    assert pooled < hd95(a, b, spacing)
