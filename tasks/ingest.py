"""Prefect tasks: raw cases -> complete cases in the slice store.

``unchanged``: before any task, the cases whose files have the size and modification time recorded
when they were ingested (``storage.nifti.stamps``): rows for them without reading a byte, so a
scheduled run over a mostly unchanged dataset starts tasks for the new and changed cases only.

``ingest_case``: one case; skipped when its files' bytes (sha256) are those it was made from.
Retried on transient I/O errors (``OSError``: a flaky disk or bucket), never on invalid data
(``InvalidCase``), which fails the task at once with a one-line reason naming the file. Returns
metadata only; the arrays go straight from the worker to the store.

``ingest_cases``: a few cases in one task run, what the ingest flow maps over Dask. A task run on a
Dask worker costs Prefect a fixed amount (its context is serialized and rebuilt for each run), a
quarter of a case's work; a batch pays it once (``batch_size``: two batches a worker thread at
least, eight cases at most). Each case is still done on its own: an invalid one
becomes a ``quarantined`` row with its reason (logged as an error) and the others go on; an
``OSError`` retries the batch, whose finished cases are then skipped (unchanged).
"""

from __future__ import annotations

import time

from prefect import get_run_logger
from prefect.runtime import task_run

from storage.cases import CaseFiles, InvalidCase
from storage.nifti import digests, read_case, read_files, stamps
from storage.store import SliceStore
from tasks.stage import stage_task
from unet.preprocess import PROFILES, preprocess_case


@stage_task("ingest-case", "ingest-{case.case_id}")
def ingest_case(case: CaseFiles, store_url: str, profile: str, dtype: str = "float16") -> dict:
    start = time.perf_counter()
    store = SliceStore(store_url, mode="a")
    stamped = stamps(case)
    files = read_files(case)  # each file read once: these bytes are hashed, and decoded if the case changed
    if store.is_current(case.case_id, digests(files), profile):
        a = store.attrs(case.case_id)
        if stamped and a.get("stamps") != stamped:  # the same bytes, rewritten or copied: known by stamp next time
            store.restamp(case.case_id, stamped)
        return _row(a, "skipped", time.perf_counter() - start)
    decoded = read_case(case, files)  # the four volumes (and labels), validated: a storage.nifti.Case
    image, label, attrs = preprocess_case(decoded, PROFILES[profile], dtype)  # InvalidCase: not a brain volume
    try:
        store.claim_slice_shape(image.shape[-2:])
    except ValueError as e:  # slices of another shape than the store's: this case is the one refused
        raise InvalidCase(case.files["flair"], str(e)) from None
    store.write_case(case.case_id, image, label, {**attrs, "stamps": stamped})
    return _row(attrs, "ingested", time.perf_counter() - start)


def unchanged(store: SliceStore, cases: list[CaseFiles], profile: str) -> tuple[list[dict], list[CaseFiles]]:
    """(skipped rows, cases to ingest): a case is skipped here when the store holds it complete, made with
    ``profile``, from files whose stamps are the ones recorded then; the others go to ``ingest_case``."""
    done = set(store.case_ids())
    rows, todo = [], []
    for case in cases:
        stamped = stamps(case) if case.case_id in done else None  # None: not in the store, or no stamp vouches
        a = store.attrs(case.case_id) if stamped else {}
        if stamped and a.get("stamps") == stamped and a.get("profile") == profile:
            rows.append(_row(a, "skipped", 0.0))
        else:
            todo.append(case)
    return rows, todo


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


def _batch_name() -> str:
    cases = task_run.parameters["cases"]
    return f"ingest-{cases[0].case_id}" + (f"-and-{len(cases) - 1}-more" if len(cases) > 1 else "")


@stage_task("ingest-cases", _batch_name)
def ingest_cases(cases: list[CaseFiles], store_url: str, profile: str, dtype: str = "float16") -> list[dict]:
    """``ingest_case`` for each case, in turn; an invalid case is a ``quarantined`` row, not a failure."""
    rows = []
    for case in cases:
        try:
            rows.append(ingest_case.fn(case, store_url, profile, dtype))
        except InvalidCase as e:
            get_run_logger().error("%s", e)
            rows.append({"case": case.case_id, "status": "quarantined", "reason": str(e)})
    return rows


MAX_CASES_PER_TASK = 8  # ~2 s of work a task run: Prefect's own cost of a run is then a few per cent


def batch_size(cases: int, threads: int) -> int:
    """Cases in a task run: at least two task runs per worker thread, so that no thread idles behind
    a slow one at the end, and at most ``MAX_CASES_PER_TASK``."""
    return max(1, min(MAX_CASES_PER_TASK, -(-cases // (2 * max(threads, 1)))))


def batches(items: list, size: int) -> list[list]:
    """``items`` in consecutive batches of at most ``size``, as even as can be."""
    n = max(1, -(-len(items) // max(1, size)))
    cut = [len(items) * i // n for i in range(n + 1)]
    return [items[a:b] for a, b in zip(cut, cut[1:]) if b > a]


def sort_out(refused: list, rows: list[dict], failed: list[tuple[list, str]]) -> tuple[list[dict], list[dict]]:
    """(the cases ingested or skipped, the quarantine): cases refused on sight, quarantined while
    read, or in a batch whose task failed, each with its one-line reason."""
    quarantine = [{"case": p.path, "reason": str(p)} for p in refused]
    quarantine += [{"case": r["case"], "reason": r["reason"]} for r in rows if r["status"] == "quarantined"]
    quarantine += [{"case": case.case_id, "reason": reason} for batch, reason in failed for case in batch]
    return [r for r in rows if r["status"] != "quarantined"], quarantine
