"""What inference leaves for a case in an output folder, and how a run knows it was already done.

    <out>/<case>_seg.nii.gz    the segmentation, on the scan's own grid
    <out>/<case>.json          the record, written last: the "done" marker (with the quality
                               estimate: "quality", "review", "review_reasons")
    <out>/<case>.failed.json   why the last try at the case failed (gone once it is segmented)
    <out>/review.csv           the segmentations flagged for review (the ``review`` flow appends)

A record names what its segmentation was ``made_with`` (model version, TTA, ET label,
post-processing): two runs that agree on it write the same, so a case is skipped when its record
says so (``finished``; inference also checks the input sha256s). ``writing`` holds the folder while a
pair is written, so two runs of one case at once leave one segmentation and its own record.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def outputs(out: str | Path, case_id: str) -> tuple[Path, Path]:
    """Where inference writes a case: (``<case>_seg.nii.gz``, ``<case>.json``, the record, written last)."""
    return Path(out) / f"{case_id}_seg.nii.gz", Path(out) / f"{case_id}.json"


def made_with(version: str, tta: bool, et_label: int, postprocess: bool) -> dict:
    """What a record names of how its segmentation was made: two runs that agree on it write the same."""
    return {"model_version": version, "tta": tta, "et_label": et_label, "postprocessed": postprocess}


def _read(path: Path) -> tuple[dict, float] | None:
    try:
        return json.loads(path.read_text()), path.stat().st_mtime
    except (OSError, ValueError):
        return None


def segmented(out: str | Path, case_id: str) -> tuple[dict, float] | None:
    """(record, its mtime) of the case's segmentation, whatever made it, both files there, else None."""
    seg, rec = outputs(out, case_id)
    done = _read(rec)
    return done if done is not None and seg.is_file() else None


def finished(out: str | Path, case_id: str, how: dict) -> tuple[dict, float] | None:
    """(record, its mtime) of a case segmented as ``how`` says, both files there, else None."""
    done = segmented(out, case_id)
    return done if done is not None and all(done[0].get(k) == v for k, v in how.items()) else None


def failure_path(out: str | Path, case_id: str) -> Path:
    return Path(out) / f"{case_id}.failed.json"


def note_failure(out: str | Path, case_id: str, reason: str, version: str) -> None:
    """Keep why a case failed (``<case>.failed.json``) for the inbox status; segmenting it removes the note."""
    Path(out).mkdir(parents=True, exist_ok=True)
    note = {"case": case_id, "reason": reason, "model_version": version, "at": time.time()}
    failure_path(out, case_id).write_text(json.dumps(note, indent=2))


def failed(out: str | Path, case_id: str) -> tuple[dict, float] | None:
    """(note, its mtime) of the case's last failure, if it has not been segmented since."""
    return _read(failure_path(out, case_id))


@contextmanager
def writing(folder: Path) -> Iterator[None]:
    """One writer of outputs at a time in ``folder`` (an flock on the folder itself, no lock file left),
    so that a segmentation and its record stay a pair when two runs segment the same case at once."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


REVIEW_LIST = "review.csv"
REVIEW_COLUMNS = ("case", "flagged", "model_version", "est_WT", "est_TC", "est_ET", "reasons", "segmentation")


def add_to_review_list(out: str | Path, record: dict) -> Path:
    """Append a flagged segmentation's record to ``<out>/review.csv`` (a reading room's list: one row
    per case and model version, so a second announcement of the same one adds nothing)."""
    path = Path(out) / REVIEW_LIST
    q = record.get("quality") or {}
    row = {
        "case": record["case"],
        "flagged": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model_version": record["model_version"],
        **{f"est_{k}": q.get(k, "") for k in ("WT", "TC", "ET")},
        "reasons": "; ".join(record.get("review_reasons", [])),
        "segmentation": record["segmentation"],
    }
    with writing(path.parent):
        listed = list(csv.DictReader(path.open())) if path.exists() else []
        if any((r["case"], r["model_version"]) == (row["case"], row["model_version"]) for r in listed):
            return path
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=REVIEW_COLUMNS)
            if new:
                w.writeheader()
            w.writerow(row)
    return path
