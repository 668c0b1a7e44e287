"""Transient I/O errors are retried by Prefect and leave everything whole; invalid data is not retried.

* ``OSError`` (disk full) on the store's write: the ingest task runs again and the case lands whole;
* ``OSError`` (EIO) on the segmentation's write: the infer task runs again, no temp file stays;
* a truncated scan in inference fails at once, with the file and the reason, and writes nothing.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from storage.cases import discover
from storage.store import SliceStore
from tasks.ingest import ingest_case
from tests.helpers import SYNTH_SHAPE, case_snapshot, register_model, synth_raw
from unet.predict import Prediction

PREFECT_TASK_LOG = pytest.mark.filterwarnings(
    "ignore:Logger 'prefect.task_runs' attempted to send logs"
)  # a task run outside a flow


@PREFECT_TASK_LOG
def test_oserror_writing_the_store_is_retried_and_the_case_lands_whole(prefect_api, tmp_path, monkeypatch):
    import zarr.storage._local as local

    raw = synth_raw(tmp_path / "raw", cases=1)
    case = discover(raw).cases[0]
    clean_url = str(tmp_path / "clean.zarr")
    ingest_case.fn(case, clean_url, "full")
    url = str(tmp_path / "s.zarr")
    SliceStore(url, mode="a")

    real, faults = local._put, []

    def full_disk(path, value, exclusive=False):
        if "/image/c" in str(path) and not faults:  # the image shard: the group exists, half a case on disk
            faults.append(path)
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
        return real(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", full_disk)
    state = ingest_case(case, url, "full", return_state=True)
    assert faults and state.is_completed(), state
    assert state.result()["status"] == "ingested"
    store = SliceStore(url)
    assert store.case_ids() == [case.case_id]
    assert case_snapshot(store, case.case_id) == case_snapshot(SliceStore(clean_url), case.case_id)


@PREFECT_TASK_LOG
def test_oserror_writing_a_segmentation_is_retried_and_leaves_no_temp_file(prefect_api, tmp_path, monkeypatch):
    import tasks.infer

    raw = synth_raw(tmp_path / "raw", cases=1, with_seg=False)
    case = discover(raw).cases[0]
    models = tmp_path / "models"
    version = register_model(models)
    out = tmp_path / "out"

    real_fsync, faults = os.fsync, []

    def failing_fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "_seg.nii.gz." in name and name.endswith(".part") and not faults:
            faults.append(fd)
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real_fsync(fd)

    reads = []
    real_read = tasks.infer.read_case
    monkeypatch.setattr(tasks.infer, "read_case", lambda c, *files: reads.append(c) or real_read(c, *files))
    monkeypatch.setattr(os, "fsync", failing_fsync)
    state = tasks.infer.infer_case(
        case, str(out), str(models), version, Prediction(device="cpu", tta=False, batch_size=16), return_state=True
    )
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert faults and state.is_completed(), state
    assert len(reads) == 2  # failed once, then did it all again
    assert sorted(p.name for p in out.iterdir()) == [
        f"{case.case_id}.json",
        f"{case.case_id}_seg.nii.gz",
    ]  # temp file removed
    assert np.asanyarray(nib.load(out / f"{case.case_id}_seg.nii.gz").dataobj).shape == SYNTH_SHAPE


@PREFECT_TASK_LOG
def test_invalid_scan_in_inference_is_not_retried(prefect_api, tmp_path, monkeypatch):
    import tasks.infer

    raw = synth_raw(tmp_path / "raw", cases=1, with_seg=False)
    case = discover(raw).cases[0]
    t2 = Path(case.files["t2"])
    t2.write_bytes(t2.read_bytes()[:-500])
    models = tmp_path / "models"
    version = register_model(models)
    reads = []
    real_read = tasks.infer.read_case
    monkeypatch.setattr(tasks.infer, "read_case", lambda c, *files: reads.append(c) or real_read(c, *files))
    state = tasks.infer.infer_case(
        case,
        str(tmp_path / "out"),
        str(models),
        version,
        Prediction(device="cpu", tta=False, batch_size=16),
        return_state=True,
    )
    assert state.is_failed() and f"{t2.name}: truncated" in state.message
    assert len(reads) == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
