"""The infer flow for real: Prefect test API, real NIfTI in and out, an untrained registered model."""

from __future__ import annotations

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from prefect.artifacts import Artifact

from flows.infer import infer
from tests.helpers import register_model


def run(params: dict):
    state = infer(**params, return_state=True)
    return state, state.result(raise_on_failure=False)


def test_real_case_segmentation_lines_up_with_the_input(prefect_api, real_case, tmp_path):
    version = register_model(tmp_path / "models", profile="tp", padding="valid")
    out = tmp_path / "out"
    params = dict(inputs=[str(real_case)], out=str(out), registry_url=str(tmp_path / "models"))
    umask = os.umask(0o022)
    try:
        state, summary = run(params)
    finally:
        os.umask(umask)
    assert state.is_completed(), state.message
    assert summary["written"] == 1 and summary["version"] == version

    case = real_case.name
    flair = nib.load(real_case / f"{case}_flair.nii.gz")
    seg = nib.load(out / f"{case}_seg.nii.gz")
    data = np.asanyarray(seg.dataobj)
    assert data.shape == (240, 240, 155) and data.dtype == np.uint8
    assert set(np.unique(data)) <= {0, 1, 2, 4}
    assert np.array_equal(seg.affine, flair.affine)
    for field in ("qform_code", "sform_code"):
        assert int(seg.header[field]) == int(flair.header[field])
    assert np.allclose(seg.header.get_zooms(), flair.header.get_zooms())
    brain = sum(
        np.asanyarray(nib.load(real_case / f"{case}_{m}.nii.gz").dataobj) != 0 for m in ("flair", "t1", "t1ce", "t2")
    )
    no_brain_slices = ~brain.any(axis=(0, 1))
    assert no_brain_slices.any() and not data[:, :, no_brain_slices].any()  # skipped: background

    for written in (out / f"{case}_seg.nii.gz", out / f"{case}.json"):  # others sharing the folder can read them
        assert written.stat().st_mode & 0o777 == 0o644
    record = json.loads((out / f"{case}.json").read_text())
    assert record["model_version"] == version and record["profile"] == "tp"
    assert set(record["sha256"]) == {"flair", "t1", "t1ce", "t2"}  # the seg beside it is not an input
    voxels = {k: int(np.isin(data, v).sum()) for k, v in {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}.items()}
    assert record["volumes_ml"]["WT"] == pytest.approx(voxels["WT"] / 1000, abs=1e-3)  # 1 mm voxels
    assert record["volumes_ml"]["ET"] == pytest.approx(voxels["ET"] / 1000, abs=1e-3)

    stamp = (out / f"{case}_seg.nii.gz").stat().st_mtime_ns
    state, summary = run(params)
    assert state.is_completed() and summary["skipped"] == 1 and summary["written"] == 0
    assert (out / f"{case}_seg.nii.gz").stat().st_mtime_ns == stamp
    assert Artifact.get("infer-cases").data and "skipped" in json.dumps(Artifact.get("infer-cases").data)


def test_a_bad_scan_fails_alone_and_a_new_model_redoes_the_rest(prefect_api, small_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(small_raw, raw)
    cases = sorted(p for p in raw.glob("*/*") if p.is_dir())
    bad = cases[2]
    t1ce = bad / f"{bad.name}_t1ce.nii.gz"
    t1ce.write_bytes(t1ce.read_bytes()[:-4000])  # truncated download
    for c in cases:
        (c / f"{c.name}_seg.nii.gz").unlink()  # new scans come without a segmentation
    models, out = tmp_path / "models", tmp_path / "out"
    first = register_model(models)

    params = dict(inputs=[str(raw)], out=str(out), registry_url=str(models))
    state, summary = run(params)
    assert state.is_failed() and "1 scan(s) failed" in state.message
    assert f"{bad.name}_t1ce.nii.gz: truncated" in state.message
    assert summary["written"] == len(cases) - 1 and summary["failed"] == 1
    assert not (out / f"{bad.name}_seg.nii.gz").exists() and not (out / f"{bad.name}.json").exists()
    good = [c.name for c in cases if c != bad]
    assert all((out / f"{c}.json").is_file() and (out / f"{c}_seg.nii.gz").is_file() for c in good)
    assert not list(out.glob(".*.part"))
    assert "Failed" in Artifact.get("infer-summary").data

    shutil.rmtree(bad)
    second = register_model(models, seed=1)  # now the best: everything is redone with it
    state, summary = run(params)
    assert state.is_completed() and summary["written"] == len(good) and summary["skipped"] == 0
    assert {json.loads((out / f"{c}.json").read_text())["model_version"] for c in good} == {second} != {first}
    state, summary = run({**params, "version": first})  # the older outputs were replaced
    assert summary["written"] == len(good)
