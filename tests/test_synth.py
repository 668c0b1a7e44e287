"""Tests for the synthetic BraTS generator (storage/synth.py)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from storage import phantom, synth

SMALL = (64, 64, 40)
MEDIUM = (96, 96, 60)
FILES = ("flair", "t1", "t1ce", "t2", "seg")


def _case(seed: int, grade: str = "HGG", shape=SMALL) -> dict[str, np.ndarray]:
    return synth.make_case(np.random.default_rng(seed), shape=shape, grade=grade)


def _load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


# --------------------------------------------------------------------------- arrays


def test_brats_affine_matches_real_files() -> None:
    expected = np.array([[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    np.testing.assert_array_equal(synth.brats_affine((240, 240, 155)), expected)
    np.testing.assert_array_equal(synth.BRATS_AFFINE(SMALL)[1, 3], SMALL[1] - 1)
    assert synth.MODALITIES == ("flair", "t1", "t1ce", "t2")


def test_make_case_keys_shape_dtype() -> None:
    case = _case(0)
    assert set(case) == set(FILES)
    for name in FILES:
        assert case[name].shape == SMALL
        assert case[name].dtype == np.int16


@pytest.mark.parametrize("grade", ["HGG", "LGG"])
@pytest.mark.parametrize("seed", range(6))
def test_labels_grades_and_brain_mask(seed: int, grade: str) -> None:
    case = _case(seed, grade)
    seg = case["seg"]
    labels = set(np.unique(seg).tolist())
    assert labels <= {0, 1, 2, 4}
    assert 1 in labels and (seg > 0).sum() > 10
    if grade == "HGG":
        assert 4 in labels
    else:
        assert 4 not in labels

    brain = case["flair"] > 0
    for modality in synth.MODALITIES:
        assert ((case[modality] > 0) == brain).all(), "every modality shares one skull-stripped mask"
        assert case[modality].min() == 0
    assert brain[seg > 0].all(), "tumour lies inside the brain"
    # A head, not a box: compact, not touching the field-of-view borders, on a subset of slices.
    assert 0.1 < brain.mean() < 0.4
    for axis in range(3):
        edges = np.take(brain, [0, brain.shape[axis] - 1], axis=axis)
        assert not edges.any()
    assert ndimage.label(brain)[1] == 1


def test_brain_mask_helper_describes_the_same_case() -> None:
    case = _case(3, shape=MEDIUM)
    masks = synth._tissue_masks(np.random.default_rng(3), shape=MEDIUM)
    np.testing.assert_array_equal(masks["brain"], case["t1"] > 0)
    for name in ("wm", "gm", "csf"):
        assert masks[name].sum() > 500
        assert not (masks[name] & ~masks["brain"]).any()


def _mean(volume: np.ndarray, mask: np.ndarray) -> float:
    assert mask.sum() > 20
    return float(volume[mask].mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_tissue_contrasts(seed: int) -> None:
    case = _case(seed, shape=MEDIUM)
    masks = synth._tissue_masks(np.random.default_rng(seed), shape=MEDIUM)
    healthy = case["seg"] == 0
    wm, gm, csf = (masks[k] & healthy for k in ("wm", "gm", "csf"))
    t1 = [_mean(case["t1"], m) for m in (wm, gm, csf)]
    t2 = [_mean(case["t2"], m) for m in (wm, gm, csf)]
    flair = [_mean(case["flair"], m) for m in (wm, gm, csf)]
    t1ce = [_mean(case["t1ce"], m) for m in (wm, gm, csf)]
    assert t1[0] > t1[1] > t1[2], "T1: WM > GM > CSF"
    assert t2[2] > t2[1] > t2[0], "T2: CSF > GM > WM"
    assert flair[1] > flair[0] > flair[2], "FLAIR: GM > WM, CSF dark"
    assert t1ce[0] > t1ce[2], "T1ce: T1-like, CSF dark"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tumour_contrasts_hgg(seed: int) -> None:
    case = _case(seed, shape=MEDIUM)
    seg, brain = case["seg"], case["t1"] > 0
    healthy = brain & (seg == 0)
    et, ed, ncr = seg == 4, seg == 2, seg == 1
    assert _mean(case["t1ce"], et) > 1.5 * _mean(case["t1ce"], healthy), "enhancing rim bright on T1ce"
    assert _mean(case["flair"], ed) > 1.2 * _mean(case["flair"], healthy), "oedema bright on FLAIR"
    assert _mean(case["t2"], ed) > _mean(case["t2"], healthy), "oedema bright on T2"
    if ncr.sum() > 20:
        assert _mean(case["t1ce"], ncr) < _mean(case["t1ce"], et), "necrosis dark on T1ce"
        assert _mean(case["t1"], ncr) < _mean(case["t1"], healthy), "necrosis dark on T1"
        assert _mean(case["t2"], ncr) > _mean(case["t2"], healthy), "necrosis bright on T2"
    assert ed.sum() > (et | ncr).sum() * 0.5, "oedema is a substantial shell around the core"


def test_lgg_is_lower_contrast_and_not_enhancing() -> None:
    case = _case(4, "LGG", shape=MEDIUM)
    seg, brain = case["seg"], case["t1"] > 0
    healthy = brain & (seg == 0)
    core = seg == 1
    assert _mean(case["flair"], seg > 0) > _mean(case["flair"], healthy)
    assert _mean(case["t1ce"], core) < 1.3 * _mean(case["t1ce"], healthy), "no enhancement"


def test_tumours_vary_in_position_and_size() -> None:
    centres, sizes = [], []
    for seed in range(8):
        seg = _case(seed)["seg"]
        centres.append(np.argwhere(seg > 0).mean(axis=0))
        sizes.append(int((seg > 0).sum()))
    centres = np.array(centres)
    midline = SMALL[0] / 2
    assert (centres[:, 0] < midline).any() and (centres[:, 0] > midline).any(), "both hemispheres"
    assert max(sizes) > 2 * min(sizes)


def test_determinism() -> None:
    a, b, c = _case(7), _case(7), _case(8)
    for name in FILES:
        np.testing.assert_array_equal(a[name], b[name])
    assert any(not np.array_equal(a[name], c[name]) for name in FILES)
    assert not np.array_equal(a["flair"], c["flair"])


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        synth.make_case(np.random.default_rng(0), shape=SMALL, grade="GBM")
    with pytest.raises(ValueError):
        synth.write_dataset("/nonexistent", 1, shape=SMALL, layout="nested")


def test_upsample_matches_scipy_zoom() -> None:
    coarse = np.random.default_rng(0).standard_normal((5, 7, 4)).astype(np.float32)
    expected = ndimage.zoom(coarse, (13 / 5, 20 / 7, 9 / 4), order=1, grid_mode=False)
    np.testing.assert_allclose(phantom.upsample(coarse, (13, 20, 9)), expected, atol=1e-5)


# --------------------------------------------------------------------------- files


def test_write_dataset_brats_layout(tmp_path: Path) -> None:
    dirs = synth.write_dataset(tmp_path, cases=5, seed=1, shape=SMALL, lgg_fraction=0.5)
    ids = [f"BraTS19_SYN_{i:04d}_1" for i in range(1, 6)]
    assert [d.name for d in dirs] == ids
    assert {d.parent for d in dirs} <= {tmp_path / "HGG", tmp_path / "LGG"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({d.parent.name for d in dirs})
    for d in dirs:
        assert sorted(p.name for p in d.iterdir()) == sorted(f"{d.name}_{f}.nii.gz" for f in FILES)
        has_et = (_load(d / f"{d.name}_seg.nii.gz") == 4).any()
        assert has_et == (d.parent.name == "HGG")


def test_write_dataset_grade_fraction_extremes(tmp_path: Path) -> None:
    hgg = synth.write_dataset(tmp_path / "a", cases=3, shape=SMALL, lgg_fraction=0.0)
    lgg = synth.write_dataset(tmp_path / "b", cases=3, shape=SMALL, lgg_fraction=1.0)
    assert {d.parent.name for d in hgg} == {"HGG"}
    assert {d.parent.name for d in lgg} == {"LGG"}


def test_write_dataset_flat_without_seg_and_prefix(tmp_path: Path) -> None:
    dirs = synth.write_dataset(tmp_path, cases=2, shape=SMALL, with_seg=False, layout="flat", prefix="BraTS19_NEW")
    assert dirs == [tmp_path / "BraTS19_NEW_0001_1", tmp_path / "BraTS19_NEW_0002_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [d.name for d in dirs]
    for d in dirs:
        names = sorted(p.name for p in d.iterdir())
        assert names == sorted(f"{d.name}_{m}.nii.gz" for m in synth.MODALITIES)
    assert synth.case_id("BraTS19", 0) == "BraTS19_SYN_0001_1"
    assert synth.case_id("BraTS19_NEW", 41) == "BraTS19_NEW_0042_1"


def test_files_round_trip_with_brats_headers(tmp_path: Path) -> None:
    (d,) = synth.write_dataset(tmp_path, cases=1, seed=3, shape=SMALL, lgg_fraction=0.0)
    expected = synth.make_case(_rng_after_grade_draw(3, 0), shape=SMALL, grade="HGG")
    for name in FILES:
        img = nib.load(d / f"{d.name}_{name}.nii.gz")
        header = img.header
        assert img.shape == SMALL
        assert img.get_data_dtype() == np.int16
        np.testing.assert_array_equal(img.affine, synth.brats_affine(SMALL))
        assert header.get_zooms() == (1.0, 1.0, 1.0)
        assert int(header["qform_code"]) == (1 if name == "seg" else 2)
        assert int(header["sform_code"]) == 1
        assert int(header["xyzt_units"]) == 2
        np.testing.assert_array_equal(header.get_qform(), synth.brats_affine(SMALL))
        data = np.asanyarray(img.dataobj)
        assert data.dtype == np.int16
        np.testing.assert_array_equal(data, expected[name])


def _rng_after_grade_draw(seed: int, index: int) -> np.random.Generator:
    rng = np.random.default_rng([seed, index])
    rng.random()  # write_dataset draws the grade first
    return rng


def test_earlier_cases_do_not_change_when_more_are_written(tmp_path: Path) -> None:
    few = synth.write_dataset(tmp_path / "few", cases=1, seed=9, shape=SMALL, layout="flat")
    many = synth.write_dataset(tmp_path / "many", cases=3, seed=9, shape=SMALL, layout="flat")
    for name in FILES:
        a = _load(few[0] / f"{few[0].name}_{name}.nii.gz")
        b = _load(many[0] / f"{many[0].name}_{name}.nii.gz")
        np.testing.assert_array_equal(a, b)
    other = synth.write_dataset(tmp_path / "other", cases=1, seed=10, shape=SMALL, layout="flat")
    assert not np.array_equal(
        _load(few[0] / f"{few[0].name}_flair.nii.gz"), _load(other[0] / f"{other[0].name}_flair.nii.gz")
    )


def test_write_case_rejects_wrong_shape(tmp_path: Path) -> None:
    case = _case(0)
    with pytest.raises(ValueError):
        synth.write_case(tmp_path, "X", case, shape=(64, 64, 41))


# --------------------------------------------------------------------------- full size


def test_full_size_case_looks_like_brats(tmp_path: Path) -> None:
    (d,) = synth.write_dataset(tmp_path, cases=1, seed=0, lgg_fraction=0.0)
    volumes = {name: _load(d / f"{d.name}_{name}.nii.gz") for name in FILES}
    assert all(v.shape == (240, 240, 155) and v.dtype == np.int16 for v in volumes.values())
    brain, seg = volumes["t1"] > 0, volumes["seg"]

    brain_slices = np.flatnonzero(brain.any(axis=(0, 1)))
    tumour_slices = np.flatnonzero((seg > 0).any(axis=(0, 1)))
    assert 100 <= brain_slices.size <= 150, "brain on a subset of the 155 axial slices"
    assert 20 <= tumour_slices.size <= 100
    assert 1.0e6 < brain.sum() < 2.2e6
    assert 0.001 < (seg > 0).mean() < 0.03, "whole tumour is a small fraction of the volume"

    medians = {m: float(np.median(volumes[m][brain])) for m in synth.MODALITIES}
    assert 200 < medians["flair"] < 450
    assert 380 < medians["t1"] < 700
    assert 200 < medians["t1ce"] < 450
    assert 280 < medians["t2"] < 600
    assert all(400 < volumes[m].max() < 3000 for m in synth.MODALITIES)
