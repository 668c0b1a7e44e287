"""Ingestion without Prefect: discovery, validation (one test per bad-input kind), preprocessing, store."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import time
from pathlib import Path
from statistics import NormalDist

import nibabel as nib
import numpy as np
import pytest

from storage.cases import CaseFiles, InvalidCase, case_files, discover
from storage.nifti import read_case, stamps
from storage.store import SliceStore
from storage.synth import make_case, write_case
from tasks.ingest import ingest_case
from tests.conftest import rewrite_nifti
from unet.preprocess import PROFILES, normalized_slices, preprocess_case, standard_curve

SHAPE = (48, 48, 24)
REAL_COUNTS = {0: 8_866_915, 1: 4_514, 2: 34_894, 4: 21_677}


def _case(root: Path, case_id: str = "BraTS19_T_0001_1", grade: str | None = "HGG", seed: int = 0) -> Path:
    folder = root / grade / case_id if grade else root / case_id
    folder.mkdir(parents=True)
    write_case(folder, case_id, make_case(np.random.default_rng(seed), SHAPE, "HGG"), SHAPE)
    return folder


def _invalid(folder: Path, *needles: str) -> str:
    with pytest.raises(InvalidCase) as err:
        read_case(case_files(folder, "HGG"))
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ------------------------------------------------------------------ the real case


def test_real_case_reads_with_its_label_counts(real_case):
    case = read_case(discover(real_case).cases[0])
    assert case.files.case_id == "Brats18_2013_2_1"
    assert case.shape == (240, 240, 155) and case.image.shape == (4, 240, 240, 155)
    values, counts = np.unique(case.seg, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == REAL_COUNTS
    assert np.allclose(case.affine, [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])
    sums = dict(line.split()[::-1] for line in (real_case.parent / "SHA256SUMS").read_text().splitlines())
    assert case.sha256 == {
        m: sums[f"Brats18_2013_2_1/Brats18_2013_2_1_{m}.nii.gz"] for m in ("flair", "t1", "t1ce", "t2", "seg")
    }


def test_real_case_normalized_in_store(real_case, tmp_path):
    url = str(tmp_path / "s.zarr")
    SliceStore(url, mode="a")
    row = ingest_case.fn(discover(real_case).cases[0], url, "full")
    assert row["status"] == "ingested" and row["brain_slices"] == 129  # nonzero in any modality
    store = SliceStore(url)
    assert store.case_ids() == ["Brats18_2013_2_1"]
    image, label = store.image("Brats18_2013_2_1")[:], store.label("Brats18_2013_2_1")[:]
    assert image.shape == (155, 4, 240, 240) and image.dtype == np.float16
    assert label.shape == (155, 240, 240) and label.dtype == np.uint8
    assert np.bincount(label.ravel(), minlength=4).tolist() == [
        REAL_COUNTS[0],
        REAL_COUNTS[1],
        REAL_COUNTS[2],
        REAL_COUNTS[4],
    ]
    brain = np.any(image != 0, axis=1)
    for c in range(4):
        v = image[:, c][brain].astype(np.float64)
        assert abs(v.mean()) < 0.01 and abs(v.std() - 1) < 0.01
    assert (image[:, :, ~brain.any(axis=0)] == 0).all()
    attrs = store.attrs("Brats18_2013_2_1")
    assert attrs["profile"] == "full" and attrs["shape"] == [240, 240, 155] and attrs["complete"] is True
    assert (
        attrs["sha256"]["seg"] == hashlib.sha256((real_case / "Brats18_2013_2_1_seg.nii.gz").read_bytes()).hexdigest()
    )


def test_normalized_slices_are_numpys_float16_bit_for_bit(real_case):
    """The slab-wise normalization (cast and transposed by torch) gives exactly the bits of the plain
    numpy formula on the whole volume: the same float32 arithmetic, then numpy's float16 rounding
    (equal as numbers: the same bits but for the sign of background zeros)."""
    case = read_case(discover(real_case).cases[0])
    image, _, attrs = preprocess_case(case, PROFILES["full"], np.float16)
    volumes = [case.volumes[m] for m in ("flair", "t1", "t1ce", "t2")]
    brain = np.any([v != 0 for v in volumes], axis=0)
    for c, v in enumerate(volumes):
        plain = (v.astype(np.float32) - attrs["mean"][c]) * np.float32(1.0 / attrs["std"][c]) * brain
        expected = plain.astype(np.float16).transpose(2, 0, 1)
        assert image[:, c].dtype == np.float16 and np.array_equal(image[:, c], expected)


def test_tp_profile_crops_and_halves(real_case):
    case = read_case(discover(real_case).cases[0])
    image, label, attrs = preprocess_case(case, PROFILES["tp"])
    assert image.shape == (155, 4, 96, 96) and label.shape == (155, 192, 192)  # labels keep the window's 1 mm
    # the 192 window, grid-centred, moved 4 voxels along W to hold the whole brain (rows 41..219)
    assert attrs["geometry"]["box"] == (24, 216, 28, 220) and attrs["brain_outside_window"] == 0
    assert set(np.unique(label)) <= {0, 1, 2, 3} and (label == 3).any()
    # the window profile: the same window, images at 1 mm, each the 2x2 block whose mean tp keeps
    fine, fine_label, fine_attrs = preprocess_case(case, PROFILES["window"])
    assert fine.shape == (155, 4, 192, 192) and np.array_equal(fine_label, label)
    assert fine_attrs["geometry"]["box"] == attrs["geometry"]["box"]
    blocks = fine.astype(np.float32).reshape(155, 4, 96, 2, 96, 2).mean(axis=(3, 5))
    assert np.abs(blocks - image.astype(np.float32)).max() < 0.02  # float16 rounding apart


def test_tp_clip_clips_each_modality_to_its_brain_percentiles_then_takes_the_z_score(real_case):
    case = read_case(discover(real_case).cases[0])
    plain, label, _ = preprocess_case(case, PROFILES["tp"], np.float32)
    image, clip_label, attrs = preprocess_case(case, PROFILES["tp-clip"], np.float32)
    assert image.shape == plain.shape and np.array_equal(clip_label, label) and attrs["profile"] == "tp-clip"
    volumes = [case.volumes[m] for m in ("flair", "t1", "t1ce", "t2")]
    brain = np.any([v != 0 for v in volumes], axis=0)
    for c, v in enumerate(volumes):
        lo, hi = np.percentile(v[brain], (0.5, 99.5))
        clipped = np.clip(v[brain].astype(np.float64), lo, hi)
        assert attrs["mean"][c] == pytest.approx(clipped.mean()) and attrs["std"][c] == pytest.approx(clipped.std())
        top = (hi - attrs["mean"][c]) / attrs["std"][c]  # no value above the clipped maximum's z-score
        assert image[:, c].max() <= top + 1e-4 and plain[:, c].max() > top + 0.5  # tp's bright tail is cut
    assert np.array_equal(image == 0, plain == 0)  # background stays exactly 0
    # window-clip: the window profile's 1 mm images, clipped and normalised as tp-clip's
    fine, fine_label, fine_attrs = preprocess_case(case, PROFILES["window-clip"], np.float32)
    assert fine.shape == (155, 4, 192, 192) and fine_label.shape == (155, 192, 192)
    assert fine_attrs["mean"] == attrs["mean"] and fine_attrs["std"] == attrs["std"]
    blocks = fine.reshape(155, 4, 96, 2, 96, 2).mean(axis=(3, 5))
    assert np.abs(blocks - image).max() < 1e-4  # tp-clip's 2 mm pixel is the mean of window-clip's four


def test_tp_hist_maps_each_modality_s_brain_percentiles_onto_a_standard_normal_s(real_case):
    case = read_case(discover(real_case).cases[0])
    volumes = [case.volumes[m] for m in ("flair", "t1", "t1ce", "t2")]
    brain = np.any([v != 0 for v in volumes], axis=0)
    ranks = PROFILES["tp-hist"].landmarks
    slices, _, _ = normalized_slices(volumes, brain, np.float32, landmarks=ranks)
    normal = [NormalDist().inv_cdf(r / 100) for r in ranks]
    for c, v in enumerate(volumes):
        mapped = slices[:, c].transpose(1, 2, 0)[brain]  # (Z, X, Y) back to the scan's voxels
        assert np.allclose(np.percentile(mapped, ranks), normal, atol=0.02)  # t1's 50th: -0.00, not its z-score
        order = np.argsort(v[brain], kind="stable")
        assert (np.diff(mapped[order]) >= -1e-5).all()  # monotone: brighter stays brighter
    assert not slices.transpose(1, 0, 2, 3)[:, ~brain.transpose(2, 0, 1)].any()  # background exactly 0
    image, label, attrs = preprocess_case(case, PROFILES["tp-hist"], np.float32)
    plain, plain_label, _ = preprocess_case(case, PROFILES["tp"], np.float32)
    assert image.shape == plain.shape and np.array_equal(label, plain_label) and attrs["profile"] == "tp-hist"
    assert np.array_equal(image == 0, plain == 0)  # background stays exactly 0


def test_standard_curve_stays_finite_and_rising_on_a_modality_zero_in_half_the_brain():
    brain = np.concatenate([np.zeros(5000), np.arange(1, 5001, dtype=np.float64)])
    xp, fp = standard_curve(brain, PROFILES["tp-hist"].landmarks)
    assert (np.diff(xp) > 0).all() and (np.diff(fp) > 0).all() and np.isfinite(fp).all()
    assert np.interp(brain, xp, fp).max() < 5  # the top end segment's slope, not a tie's


# ------------------------------------------------------------------ discovery


def test_discovers_official_flat_and_single_case_layouts(tmp_path):
    _case(tmp_path / "official", "BraTS19_A_0001_1", "HGG")
    _case(tmp_path / "official", "BraTS19_A_0002_1", "LGG")
    _case(tmp_path / "flat", "BraTS20_Training_001", None)
    single = _case(tmp_path / "single", "Brats18_2013_2_1", None)
    found = discover(tmp_path / "official", tmp_path / "flat", single)
    assert [(c.case_id, c.grade) for c in found.cases] == [
        ("BraTS19_A_0001_1", "HGG"),
        ("BraTS19_A_0002_1", "LGG"),
        ("BraTS20_Training_001", None),
        ("Brats18_2013_2_1", None),
    ]
    assert not found.problems


def test_reads_uncompressed_nii(tmp_path):
    folder = _case(tmp_path)
    for f in folder.glob("*.nii.gz"):
        f.with_suffix("").write_bytes(gzip.decompress(f.read_bytes()))
        f.unlink()
    case = read_case(discover(tmp_path).cases[0])
    assert case.image.shape == (4, *SHAPE) and case.files.files["t1"].endswith("_t1.nii")


def test_brats2023_names_are_found_without_being_asked(tmp_path):
    folder = _case(tmp_path, grade=None)
    for old, new in {"flair": "t2f", "t1ce": "t1c", "t1": "t1n", "t2": "t2w"}.items():
        (folder / f"{folder.name}_{old}.nii.gz").rename(folder / f"{folder.name}_{new}.nii.gz")
    seg = folder / f"{folder.name}_seg.nii.gz"
    rewrite_nifti(
        seg,
        np.where(np.asanyarray(nib.load(seg).dataobj) == 4, 3, np.asanyarray(nib.load(seg).dataobj)).astype(np.int16),
    )
    assert "missing flair modality" in str(
        discover(tmp_path, naming="brats2019").problems[0]
    )  # insisting on 2019 names
    case = read_case(discover(tmp_path).cases[0])
    assert case.files.edition == "brats2023"
    assert set(np.unique(case.seg)) <= {0, 1, 2, 4} and (case.seg == 4).any()


def test_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no BraTS cases found"):
        discover(tmp_path)
    with pytest.raises(FileNotFoundError, match="cannot read raw root"):
        discover(tmp_path / "missing")


def test_missing_modality_is_refused_on_sight(tmp_path):
    folder = _case(tmp_path)
    (folder / f"{folder.name}_t1ce.nii.gz").unlink()
    found = discover(tmp_path)
    assert (
        not found.cases
        and "missing t1ce modality" in str(found.problems[0])
        and "_t1ce.nii.gz" in str(found.problems[0])
    )


def test_unsafe_case_id_is_refused(tmp_path):
    _case(tmp_path, "BraTS19 bad name", "HGG")
    found = discover(tmp_path)
    assert not found.cases and "unsafe case id" in str(found.problems[0])


def test_same_case_in_hgg_and_lgg_is_refused(tmp_path):
    _case(tmp_path, "BraTS19_D_0001_1", "HGG")
    _case(tmp_path, "BraTS19_D_0001_1", "LGG")
    _case(tmp_path, "BraTS19_D_0002_1", "LGG")
    found = discover(tmp_path)
    assert [c.case_id for c in found.cases] == ["BraTS19_D_0002_1"]
    assert "also found at" in str(found.problems[0])


# ------------------------------------------------------------------ validation: one test per bad-input kind


def test_truncated_gzip(tmp_path):
    folder = _case(tmp_path)
    f = folder / f"{folder.name}_t2.nii.gz"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _invalid(folder, f.name, "truncated or corrupt gzip")


def test_truncated_uncompressed_data(tmp_path):
    folder = _case(tmp_path)
    f = folder / f"{folder.name}_t2.nii.gz"
    raw = gzip.decompress(f.read_bytes())
    f.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    _invalid(folder, f.name, "truncated: header promises")


def test_not_nifti(tmp_path):
    folder = _case(tmp_path)
    f = folder / f"{folder.name}_flair.nii.gz"
    f.write_bytes(gzip.compress(b"this is a text file, not an MRI " * 40))
    _invalid(folder, f.name, "not a readable NIfTI")


def test_shape_mismatch(tmp_path):
    folder = _case(tmp_path)
    f = folder / f"{folder.name}_t1.nii.gz"
    rewrite_nifti(f, np.ones((48, 48, 20), np.int16))
    _invalid(folder, f.name, "shape (48, 48, 20) differs")


def test_affine_mismatch(tmp_path):
    folder = _case(tmp_path)
    f = folder / f"{folder.name}_t1.nii.gz"
    data = np.asanyarray(nib.load(f).dataobj)
    rewrite_nifti(f, data, affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    _invalid(folder, f.name, "affine differs")


def test_nan_voxels(tmp_path):
    folder = _case(tmp_path)
    f = folder / f"{folder.name}_flair.nii.gz"
    data = np.asanyarray(nib.load(f).dataobj).astype(np.float32)
    data[10, 10, 10] = np.nan
    rewrite_nifti(f, data, dtype=np.float32)
    _invalid(folder, f.name, "NaN or Inf")


def test_all_zero_brain(tmp_path):
    folder = _case(tmp_path)
    f = folder / f"{folder.name}_t1.nii.gz"
    rewrite_nifti(f, np.zeros(SHAPE, np.int16))
    _invalid(folder, f.name, "all zero")


def test_labels_outside_brats(tmp_path):
    folder = _case(tmp_path)
    f = folder / f"{folder.name}_seg.nii.gz"
    data = np.asanyarray(nib.load(f).dataobj).copy()
    data[0, 0, 0] = 3
    rewrite_nifti(f, data)
    _invalid(folder, f.name, "labels [3] outside [0, 1, 2, 4]")


def test_seg_dtype(tmp_path):
    folder = _case(tmp_path)
    f = folder / f"{folder.name}_seg.nii.gz"
    rewrite_nifti(f, np.asanyarray(nib.load(f).dataobj) + 0.25, dtype=np.float32)
    _invalid(folder, f.name, "non-integral values (e.g. 0.25)")


def test_4d_image(tmp_path):
    folder = _case(tmp_path)
    f = folder / f"{folder.name}_t2.nii.gz"
    rewrite_nifti(f, np.ones((*SHAPE, 2), np.int16))
    _invalid(folder, f.name, "4D")


def test_absurd_header_dims_allocate_nothing(tmp_path):
    folder = _case(tmp_path)
    f = folder / f"{folder.name}_t2.nii.gz"
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))  # 54 TB if anyone believed it
    hdr.set_data_dtype(np.int16)
    f.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\1" * 1000))
    _invalid(folder, f.name, "absurd dimensions")


# ------------------------------------------------------------------ store


def test_half_written_case_is_invisible(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = SliceStore(url, mode="a")
    store.write_case("done", np.ones((2, 4, 8, 8), np.float16), np.zeros((2, 8, 8), np.uint8), {"case_id": "done"})
    half = store.root.create_group("cases/half", attributes={"complete": False})
    half.create_array("image", shape=(2, 4, 8, 8), dtype="float16")
    assert SliceStore(url).case_ids() == ["done"]


def test_store_refuses_a_second_profile(tmp_path):
    store = SliceStore(str(tmp_path / "s.zarr"), mode="a")
    store.claim_profile("full")
    with pytest.raises(ValueError, match="holds profile 'full', not 'tp'"):
        store.claim_profile("tp")


def test_unchanged_case_is_skipped_and_changed_case_rewritten(tmp_path):
    raw = tmp_path / "raw"
    folder = _case(raw)
    url = str(tmp_path / "s.zarr")
    SliceStore(url, mode="a")
    case = discover(raw).cases[0]
    assert ingest_case.fn(case, url, "full")["status"] == "ingested"
    assert ingest_case.fn(case, url, "full")["status"] == "skipped"
    shutil.copy(folder / f"{folder.name}_t1.nii.gz", folder / f"{folder.name}_t2.nii.gz")
    assert ingest_case.fn(case, url, "full")["status"] == "ingested"
    store = SliceStore(url)
    assert np.array_equal(store.image(folder.name)[:, 1], store.image(folder.name)[:, 3])


def test_stamps_vouch_only_for_settled_local_files(tmp_path):
    folder = _case(tmp_path / "raw")
    case = discover(tmp_path / "raw").cases[0]
    assert stamps(case) is None  # just written: a second write in the same clock tick would keep the stamp
    old = time.time() - 60
    for f in folder.iterdir():
        os.utime(f, (old, old))
    got = stamps(case)
    flair = folder / f"{folder.name}_flair.nii.gz"
    assert got["flair"] == f"{flair.stat().st_size}:{flair.stat().st_mtime_ns}" and set(got) == set(case.files)
    remote = CaseFiles(case.case_id, {**case.files, "t1": "s3://bucket/t1.nii.gz"})
    assert stamps(remote) is None  # remote files are hashed


def test_a_full_profile_store_refuses_slices_of_another_grid(real_case, tmp_path):
    """Profile full keeps each scan's own grid, and training batches need one slice shape."""
    url = str(tmp_path / "s.zarr")
    SliceStore(url, mode="a").claim_profile("full")
    ingest_case.fn(discover(real_case).cases[0], url, "full")
    small = _case(tmp_path / "raw")
    with pytest.raises(InvalidCase) as err:
        ingest_case.fn(case_files(small, "HGG"), url, "full")
    assert str(err.value).startswith(
        str(small / f"{small.name}_flair.nii.gz") + ": slices 48x48 differ from the store's 240x240"
    )
    assert "\n" not in str(err.value) and SliceStore(url).case_ids() == ["Brats18_2013_2_1"]


@pytest.mark.parametrize(
    "n,size,expected", [(42, 4, [3, 4, 4, 4, 4, 3, 4, 4, 4, 4, 4]), (5, 4, [2, 3]), (3, 1, [1, 1, 1]), (0, 4, [])]
)
def test_cases_are_batched_evenly_in_order(n, size, expected):
    from tasks.ingest import batches

    got = batches(list(range(n)), size)
    assert [len(b) for b in got] == expected and [i for b in got for i in b] == list(range(n))


@pytest.mark.parametrize("cases,threads,size", [(42, 2, 8), (6, 2, 2), (6, 1, 3), (42, 16, 2), (3, 16, 1), (0, 2, 1)])
def test_batch_size_gives_each_thread_two_runs_at_least_and_a_run_8_cases_at_most(cases, threads, size):
    from tasks.ingest import batch_size

    assert batch_size(cases, threads) == size


@pytest.mark.parametrize(
    "dtype,shape", [("float16", (7, 4, 24, 20)), ("float32", (5, 4, 16, 16)), ("uint8", (6, 24, 20))]
)
def test_slices_are_written_byte_for_byte_as_zarr_writes_them(tmp_path, dtype, shape):
    import zarr

    from storage.shards import COMPRESSOR, WRITE, write_slices

    rng = np.random.default_rng(0)
    data = rng.normal(size=shape) * (rng.random(shape) > 0.5) if dtype != "uint8" else rng.integers(0, 4, shape)
    data = data.astype(dtype)
    data[0] = 0  # a slice without brain: written all the same
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="a", zarr_format=3)
    ours = write_slices(root, "ours", data)
    theirs = root.create_array(
        "theirs", data=data, chunks=(1, *shape[1:]), shards=shape, compressors=COMPRESSOR, config=WRITE
    )
    shard = "c/" + "/".join(["0"] * len(shape))
    assert (tmp_path / "s.zarr" / "ours" / shard).read_bytes() == (tmp_path / "s.zarr" / "theirs" / shard).read_bytes()
    assert ours.metadata == theirs.metadata
    assert np.array_equal(ours[:], data) and np.array_equal(ours[3], data[3])
