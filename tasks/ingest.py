"""Prefect task: one raw case -> one complete case in the slice store.

Retried on transient I/O errors (``OSError``: a flaky disk or bucket), never on invalid data
(``InvalidCase``), which fails the task at once with a one-line reason naming the file.
Returns metadata only; the arrays go straight from the worker to the store.
"""

from __future__ import annotations

import time

from storage.nifti import CaseFiles, InvalidCase, digests, read_case, read_files
from storage.store import SliceStore
from tasks.preset import stage_task
from unet.preprocess import PROFILES, preprocess_case


@stage_task("ingest-case", "ingest-{case.case_id}")
def ingest_case(case: CaseFiles, store_url: str, profile: str, dtype: str = "float16") -> dict:
    start = time.perf_counter()
    store = SliceStore(store_url, mode="a")
    files = read_files(case)  # each file read once: these bytes are hashed, and decoded if the case changed
    if store.is_current(case.case_id, digests(files), profile):
        a = store.attrs(case.case_id)
        return _row(a, "skipped", time.perf_counter() - start)
    raw = read_case(case, files)
    image, label, attrs = preprocess_case(raw, PROFILES[profile], dtype)  # InvalidCase: not a brain volume
    try:
        store.claim_slice_shape(image.shape[-2:])
    except ValueError as e:  # slices of another shape than the store's: this case is the one refused
        raise InvalidCase(case.files["flair"], str(e)) from None
    store.write_case(case.case_id, image, label, attrs)
    return _row(attrs, "ingested", time.perf_counter() - start)


def _row(attrs: dict, status: str, seconds: float) -> dict:
    labels = attrs.get("label_voxels") or {}
    return {
        "case": attrs["case_id"],
        "grade": attrs.get("grade") or "",
        "status": status,
        "slices": len(attrs["slice_brain"]),
        "brain_slices": sum(1 for n in attrs["slice_brain"] if n),
        "brain_voxels": attrs["brain_voxels"],
        "tumour_voxels": sum(labels.values()) if labels else 0,
        "seconds": round(seconds, 2),
    }
