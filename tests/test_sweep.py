"""The sweep flow: it segments the scans in the inbox that have no segmentation yet (pending), leaves
alone those done, still arriving, or announced a moment ago (their triggered run is on its way), and
takes over an announced scan whose run never came."""

from __future__ import annotations

import json

from flows.cli.main import main
from flows.infer import infer
from flows.sweep import sweep
from storage.inbox import STATE_NAME, record, scan_inbox, standing
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


def test_the_inbox_status_says_where_each_scan_stands_and_why(prefect_api, small_raw, tmp_path, capsys):
    """``brats inbox``: incomplete (why), pending, failed (the run's one-line reason), segmented (by
    which version, and whether it is still the best); a scan changed since is pending again."""
    models, out, inbox = tmp_path / "models", tmp_path / "out", tmp_path / "inbox"
    first = register_model(models)
    src = case_folders(small_raw)
    good, bad = new_scan(src[0], inbox, "NEW_000"), new_scan(src[1], inbox, "NEW_001")
    (bad / "NEW_001_t1.nii.gz").write_bytes(b"not a NIfTI file")
    new_scan(src[2], inbox, "NEW_002", channels=("flair", "t1", "t1ce"))  # t2 still to come
    new_scan(src[3], inbox, "NEW_003")
    state = infer([str(good), str(bad)], str(out), registry_url=str(models), return_state=True)
    assert state.is_failed()

    rows = {r["case"]: r for r in standing(inbox, out, first)}
    assert {c: r["status"] for c, r in rows.items()} == {
        "NEW_000": "segmented",
        "NEW_001": "failed",
        "NEW_002": "incomplete",
        "NEW_003": "pending",
    }
    assert (rows["NEW_000"]["version"], rows["NEW_000"]["best"]) == (first, True)
    assert "NEW_001_t1.nii.gz" in rows["NEW_001"]["why"] and "\n" not in rows["NEW_001"]["why"]
    assert "t2" in rows["NEW_002"]["why"]

    second = register_model(models, seed=1)  # a new best: NEW_000's segmentation is an older model's
    assert main(["inbox", str(inbox), "--out", str(out), "--registry", str(models)]) == 0
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("NEW_000"))
    assert "segmented" in line and first in line and line.split()[3] == "no"
    assert "1 pending, 1 failed, 1 incomplete, 1 segmented" in printed and second in printed

    (bad / "NEW_001_t1.nii.gz").write_bytes((src[1] / f"{src[1].name}_t1.nii.gz").read_bytes())  # fixed
    assert {r["case"]: r["status"] for r in standing(inbox, out, second)}["NEW_001"] == "pending"
