"""Real releases as they come: seg dtypes, namings of every BraTS edition, other grids and spacings.

Every variant is made from the one real case (tests/data): its files renamed, its seg recast, its
volumes cropped, padded, reoriented or resampled with the affine kept true, so each is the same
anatomy on another grid. Reading and preprocessing run without Prefect; one infer flow run takes
the whole mixed folder at once.
"""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from storage.brats import BRATS_TO_CLASS
from storage.cases import InvalidCase, case_files, discover
from storage.nifti import read_case
from unet.geometry import Geometry, to_labels
from unet.preprocess import PROFILES, preprocess_case

CHANNELS = ("flair", "t1", "t1ce", "t2", "seg")
SUFFIXES_2023 = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}
COUNTS = {0: 8_866_915, 1: 4_514, 2: 34_894, 4: 21_677}


@pytest.fixture(scope="module")
def real(real_case) -> dict[str, nib.Nifti1Image]:
    """The real case's five images, loaded once (data in memory)."""
    return {
        c: nib.Nifti1Image(
            np.asanyarray(nib.load(real_case / f"{real_case.name}_{c}.nii.gz").dataobj),
            nib.load(real_case / f"{real_case.name}_{c}.nii.gz").affine,
        )
        for c in CHANNELS
    }


def write(
    root, case_id: str, images: dict[str, nib.Nifti1Image], *, sep="_", suffixes=None, ext=".nii", seg_dtype=None
):
    """One case folder: ``<case_id><sep><suffix><ext>`` for each image, qform and sform both set."""
    folder = root / case_id
    folder.mkdir(parents=True)
    for channel, img in images.items():
        data = np.asanyarray(img.dataobj)
        dtype = seg_dtype if channel == "seg" and seg_dtype is not None else data.dtype
        out = nib.Nifti1Image(data.astype(dtype), img.affine)
        out.set_data_dtype(dtype)
        out.set_qform(img.affine, code=1)
        out.set_sform(img.affine, code=1)
        nib.save(out, folder / f"{case_id}{sep}{(suffixes or {}).get(channel, channel)}{ext}")
    return folder


# ------------------------------------------------------------------ other grids, same anatomy


def mni_grid(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """182x218x182 (the MNI152 1 mm grid's size): x and y cropped, z padded; the brain stays whole."""
    data = np.asanyarray(img.dataobj)[29:211, 20:238]
    data = np.pad(data, ((0, 0), (0, 0), (13, 14)))
    return nib.Nifti1Image(data, img.affine @ _translate(29, 20, -13))


def half_mm(img: nib.Nifti1Image, z=slice(60, 90)) -> nib.Nifti1Image:
    """0.5 mm in-plane (images linear, labels nearest), 30 slices through the tumour."""
    data = np.asanyarray(img.dataobj)[:, :, z]
    seg = img.get_data_dtype().kind in "iu" and data.max() <= 4
    out = ndimage.zoom(data.astype(np.float32), (2, 2, 1), order=0 if seg else 1, grid_mode=True, mode="grid-constant")
    affine = img.affine @ _translate(0, 0, z.start) @ np.diag([0.5, 0.5, 1, 1]) @ _translate(-0.5, -0.5, 0)
    return nib.Nifti1Image(np.rint(out).astype(data.dtype) if data.dtype.kind in "iu" else out, affine)


def _translate(x, y, z) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = (x, y, z)
    return t


def reoriented(img: nib.Nifti1Image, axcodes: str) -> nib.Nifti1Image:
    """The same image stored in another voxel order (nibabel keeps the affine true)."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    return img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(tuple(axcodes))))


def round_trip(case_dir, profile: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(labels back on the scan's grid, the scan's own labels, attrs): the seg through the network's
    slices and back, as a perfect network's prediction would go."""
    case = read_case(case_files(case_dir))
    _, labels, attrs = preprocess_case(case, PROFILES[profile], grow=True)
    g = replace(Geometry.from_dict(attrs["geometry"]), factor=1)  # labels stay at the window's 1 mm
    back = to_labels(g, g.restore(np.moveaxis(np.eye(4, dtype=np.float32)[labels], -1, 1)))
    return back, case.seg, attrs


def dice(a, b) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


# ------------------------------------------------------------------ seg dtypes


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.uint16, np.int32, np.float32, np.float64])
def test_seg_in_any_integer_dtype_or_whole_floats_reads_the_same(real, tmp_path, dtype):
    folder = write(tmp_path, "Brats18_2013_2_1", real, seg_dtype=dtype)
    case = read_case(case_files(folder))
    assert case.seg.dtype == np.uint8
    values, counts = np.unique(case.seg, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == COUNTS


@pytest.mark.parametrize(
    "value,dtype,reason",
    [
        (0.5, np.float32, "non-integral values (e.g. 0.5)"),
        (np.nan, np.float32, "NaN or Inf"),
        (300, np.uint16, "labels [300] outside [0, 1, 2, 4]"),
        (-1, np.int32, "labels [-1] outside [0, 1, 2, 4]"),
        (3, np.uint8, "labels [3] outside [0, 1, 2, 4] (enhancing tumour is 4 in this edition)"),
    ],
)
def test_seg_values_that_are_not_labels_are_refused_in_one_line(real, tmp_path, value, dtype, reason):
    seg = np.asanyarray(real["seg"].dataobj).astype(np.float64)
    seg[100, 100, 70] = value
    folder = write(
        tmp_path, "Brats18_2013_2_1", {**real, "seg": nib.Nifti1Image(seg, real["seg"].affine)}, seg_dtype=dtype
    )
    with pytest.raises(InvalidCase) as err:
        read_case(case_files(folder))
    assert reason in str(err.value) and "Brats18_2013_2_1_seg.nii" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ namings of every edition


@pytest.mark.parametrize(
    "case_id,sep,suffixes,edition",
    [
        ("BraTS19_2013_2_1", "_", None, "brats2019"),
        ("BraTS20_Training_001", "_", None, "brats2019"),
        ("BraTS2021_00006", "_", None, "brats2019"),  # BraTS 2021: 2019 suffixes, ET still 4
        ("BraTS-GLI-00000-000", "-", SUFFIXES_2023, "brats2023"),  # BraTS 2023 as released
        ("BraTS-GLI-00000-000", "_", SUFFIXES_2023, "brats2023"),
        ("BraTS-GLI-00000-000", "_", None, "brats2023"),  # 2023 id with flair/t1/t1ce/t2 names: ET is 3
    ],
)
def test_naming_and_edition_are_found_per_case(real, tmp_path, case_id, sep, suffixes, edition):
    seg = np.asanyarray(real["seg"].dataobj)
    if edition == "brats2023":
        seg = np.where(seg == 4, 3, seg).astype(np.float32)  # 2023 labels, as float32 like some copies
    write(
        tmp_path / "root",
        case_id,
        {**real, "seg": nib.Nifti1Image(seg, real["seg"].affine)},
        sep=sep,
        suffixes=suffixes,
        ext=".nii.gz",
    )
    found = discover(tmp_path / "root")
    assert not found.problems and [c.case_id for c in found.cases] == [case_id]
    case = read_case(found.cases[0])
    assert case.files.edition == edition and case.files.et_label == (3 if edition == "brats2023" else 4)
    assert np.bincount(case.seg.ravel(), minlength=5)[[1, 2, 4]].tolist() == [COUNTS[1], COUNTS[2], COUNTS[4]]


def test_naming_override_and_ambiguous_folders(real, tmp_path):
    folder = write(
        tmp_path, "BraTS-GLI-00001-000", {k: v for k, v in real.items() if k != "seg"}, sep="-", suffixes=SUFFIXES_2023
    )
    assert case_files(folder, naming="brats2023").files["flair"].endswith("-t2f.nii")
    assert case_files(folder, naming="brats2021").files["flair"].endswith("-t2f.nii")  # its former name
    with pytest.raises(InvalidCase, match="missing flair modality"):
        case_files(folder, naming="brats2019")
    for channel in ("flair", "t1", "t1ce", "t2"):  # both families complete: which one is meant?
        nib.save(real[channel], folder / f"BraTS-GLI-00001-000_{channel}.nii.gz")
    with pytest.raises(InvalidCase, match="holds both flair/t1/t1ce/t2 and t2f/t1n/t1c/t2w files"):
        case_files(folder)
    with pytest.raises(ValueError, match="unknown naming"):
        discover(tmp_path, naming="brats2024")


# ------------------------------------------------------------------ any grid


@pytest.mark.parametrize("profile", ["full", "tp", "window"])
@pytest.mark.parametrize("grid", ["brats", "mni", "ras", "sagittal"])
def test_other_grids_map_to_the_slices_and_back_losslessly(real, tmp_path, grid, profile):
    """The seg through the slices and back: exact in every profile (tp halves the images' resolution,
    not the labels'); no brain voxel cut from the window."""
    make = {
        "brats": lambda i: i,
        "mni": mni_grid,
        "ras": lambda i: reoriented(i, "RAS"),
        "sagittal": lambda i: reoriented(i, "ASL"),
    }[grid]
    folder = write(tmp_path, "Brats18_2013_2_1", {c: make(img) for c, img in real.items()})
    back, truth, attrs = round_trip(folder, profile)
    assert back.shape == truth.shape == nib.load(folder / "Brats18_2013_2_1_flair.nii").shape
    assert attrs["brain_outside_window"] == 0
    assert np.array_equal(back, truth)


def test_finer_in_plane_spacing_is_resampled_there_and_back(real, tmp_path):
    folder = write(tmp_path, "Brats18_2013_2_1", {c: half_mm(img) for c, img in real.items()})
    back, truth, attrs = round_trip(folder, "full")
    g = Geometry.from_dict(attrs["geometry"])
    assert truth.shape == (480, 480, 30) and g.plane == (240, 240) and g.resampled
    assert back.shape == truth.shape
    assert dice(back > 0, truth > 0) > 0.97 and dice(back == 4, truth == 4) > 0.9


def test_thick_slices_and_other_slice_counts_need_no_resampling(real, tmp_path):
    thick = {c: img.slicer[:, :, ::3] for c, img in real.items()}  # 3 mm slices, 52 of them
    folder = write(tmp_path, "Brats18_2013_2_1", thick)
    back, truth, attrs = round_trip(folder, "full")
    assert truth.shape == (240, 240, 52) and not Geometry.from_dict(attrs["geometry"]).resampled
    assert np.array_equal(back, truth)


@pytest.mark.parametrize(
    "shape,needle", [((240, 240), "image is 2D"), ((240, 1, 155), "240×1 voxels in the axial plane")]
)
def test_what_is_not_a_brain_volume_is_refused_in_one_line(real, tmp_path, shape, needle):
    images = {c: nib.Nifti1Image(np.ones(shape, np.int16), np.diag([-1.0, -1.0, 1.0, 1.0])) for c in CHANNELS[:4]}
    folder = write(tmp_path, "BraTS19_FLAT_1", images)
    with pytest.raises((InvalidCase, ValueError)) as err:
        case = read_case(case_files(folder))
        preprocess_case(case, PROFILES["tp"], grow=True)
    assert needle in str(err.value) and "BraTS19_FLAT_1_flair.nii" in str(err.value) and "\n" not in str(err.value)


def test_labels_of_a_stored_case_are_the_networks_classes(real, tmp_path):
    folder = write(
        tmp_path,
        "BraTS-GLI-00002-000",
        {
            **real,
            "seg": nib.Nifti1Image(
                np.where(np.asanyarray(real["seg"].dataobj) == 4, 3, np.asanyarray(real["seg"].dataobj)).astype(
                    np.uint16
                ),
                real["seg"].affine,
            ),
        },
        sep="-",
        suffixes=SUFFIXES_2023,
    )
    case = read_case(case_files(folder))
    _, labels, attrs = preprocess_case(case, PROFILES["full"])
    assert attrs["edition"] == "brats2023"
    assert np.bincount(labels.ravel(), minlength=4).tolist() == [COUNTS[0], COUNTS[1], COUNTS[2], COUNTS[4]]
    assert (labels.transpose(1, 2, 0) == BRATS_TO_CLASS[case.seg]).all()


# ------------------------------------------------------------------ one inference run over all of them


def test_inference_writes_every_release_on_its_own_grid_with_its_own_et_label(prefect_api, real, tmp_path):
    """One flow run over a folder mixing editions and grids: each segmentation lies on its input's grid
    and affine, uses its edition's ET label (or the one asked for), and the same anatomy stored in
    another voxel order gets the very same segmentation."""
    from flows.infer import infer
    from tests.helpers import register_model

    inbox = tmp_path / "inbox"
    scans = {c: img for c, img in real.items() if c != "seg"}
    write(inbox, "Brats18_2013_2_1", scans)
    write(inbox, "BraTS19_RAS_1", {c: reoriented(img, "RAS") for c, img in scans.items()})
    write(inbox, "BraTS19_SAG_1", {c: reoriented(img, "ASL") for c, img in scans.items()})
    write(
        inbox,
        "BraTS-GLI-00000-000",
        {c: mni_grid(img) for c, img in scans.items()},
        sep="-",
        suffixes=SUFFIXES_2023,
        ext=".nii.gz",
    )
    write(inbox, "BraTS19_HALF_1", {c: half_mm(img) for c, img in scans.items()})
    models = tmp_path / "models"
    register_model(models, profile="tp", padding="same", seed=4)

    out = tmp_path / "out"
    state = infer([str(inbox)], str(out), registry_url=str(models), return_state=True)
    assert state.is_completed(), state.message
    segs = {}
    for folder in sorted(p for p in inbox.iterdir()):
        flair = nib.load(
            next(folder.glob("*[_-]t2f.nii*")) if "GLI" in folder.name else next(folder.glob("*_flair.nii*"))
        )
        seg = nib.load(out / f"{folder.name}_seg.nii.gz")
        assert seg.shape == flair.shape and np.allclose(seg.affine, flair.affine), folder.name
        segs[folder.name] = np.asanyarray(seg.dataobj)
        record = json.loads((out / f"{folder.name}.json").read_text())
        assert record["et_label"] == (3 if "GLI" in folder.name else 4)
        assert set(np.unique(segs[folder.name])) <= ({0, 1, 2, 3} if "GLI" in folder.name else {0, 1, 2, 4})
    base = segs["Brats18_2013_2_1"]
    assert len(np.unique(base)) > 2  # the random network predicts several classes: the comparisons mean something
    same_world = {
        "BraTS19_RAS_1": reoriented(nib.Nifti1Image(base, real["flair"].affine), "RAS"),
        "BraTS19_SAG_1": reoriented(nib.Nifti1Image(base, real["flair"].affine), "ASL"),
    }
    for name, expected in same_world.items():
        assert np.array_equal(segs[name], np.asanyarray(expected.dataobj)), name

    state = infer(
        [str(inbox / "BraTS-GLI-00000-000")], str(out), registry_url=str(models), et_label=4, return_state=True
    )
    assert state.is_completed() and state.result()["written"] == 1  # another ET label: written again
    relabelled = np.asanyarray(nib.load(out / "BraTS-GLI-00000-000_seg.nii.gz").dataobj)
    assert np.array_equal(relabelled, np.where(segs["BraTS-GLI-00000-000"] == 3, 4, segs["BraTS-GLI-00000-000"]))
