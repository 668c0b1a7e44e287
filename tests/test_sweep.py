"""The sweep flow: it segments the scans in the inbox that have no segmentation yet (pending), leaves
alone those done, still arriving, or announced a moment ago (their triggered run is on its way), and
takes over an announced scan whose run never came."""

from __future__ import annotations

import json

from flows.sweep import sweep
from storage.inbox import STATE_NAME, record, scan_inbox
from tests.helpers import case_folders, new_scan, register_model


def test_sweep_segments_what_is_missing_and_only_that(prefect_api, small_raw, tmp_path):
    models, out, inbox = tmp_path / "models", tmp_path / "out", tmp_path / "inbox"
    version = register_model(models)
    src = case_folders(small_raw)
    for i in range(3):
        new_scan(src[i], inbox, f"NEW_00{i}")
    complete, _ = scan_inbox(inbox)
    record(inbox / STATE_NAME, [complete["NEW_002"]], "watch")  # announced a moment ago: its run is on its way
    params = dict(inbox=[str(inbox)], out=str(out), registry_url=str(models), settle_s=0.0)

    state = sweep(**params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["pending"], summary["announced"], summary["written"], summary["version"]) == (2, 1, 2, version)
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == ["NEW_000_seg.nii.gz", "NEW_001_seg.nii.gz"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    new_scan(src[3], inbox, "NEW_003")  # still arriving
    summary = sweep(**{**params, "settle_s": 3600.0}, return_state=True).result()
    assert (summary["done"], summary["announced"], summary["arriving"], summary["pending"]) == (2, 1, 1, 0)
    assert summary["written"] == 0 and not (out / "NEW_003.json").exists()

    summary = sweep(**{**params, "grace_s": 0.0}, return_state=True).result()  # the watcher's run never came
    assert (summary["done"], summary["pending"], summary["written"]) == (2, 2, 2)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in stamps} == stamps  # nothing done twice
    done = json.loads((out / "NEW_003.json").read_text())
    assert done["model_version"] == version and done["inputs"]["flair"] == str(
        inbox / "NEW_003" / "NEW_003_flair.nii.gz"
    )
