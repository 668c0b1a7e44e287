"""Flow ``ingest``: raw BraTS folders -> normalized axial slices in a Zarr store, in parallel on Dask.

discover cases -> set aside those unchanged since ingested (size, modification time) -> ingest_cases mapped
over Dask, a few cases a task (skip unchanged bytes, quarantine invalid) ->
patient-level split of the labelled cases + fingerprint -> artifacts (cases, quarantine, summary)
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Failed

from flows.sections import documented, sections
from storage.cases import discover
from storage.store import SliceStore
from tasks import report
from tasks.artifacts import RunProgress
from tasks.ingest import batch_size, batches, ingest_cases, sort_out, unchanged
from tasks.runners import cluster_threads, dask_runner
from tasks.stage import gather
from unet.preprocess import Preprocessing


@flow(name="ingest", task_runner=dask_runner(), log_prints=True)
@documented
def ingest(
    raw: list[str],
    store_url: str,
    data: Preprocessing = Preprocessing(),
    cases_per_task: int | None = None,
    rehash: bool = False,
) -> dict:
    """Raw BraTS folders -> normalized axial slices in a Zarr store, in parallel on Dask.

    Args:
        cases_per_task: cases per Prefect task run (each run has a fixed cost on Dask); default: two runs per Dask
            worker thread at least, 8 cases at most; 1: a run per case
        rehash: read and hash every file, even those whose size and modification time are as recorded
    """
    log = get_run_logger()
    (data,) = sections(data=data)
    shown = report.used(data=data)
    found = discover(*raw, naming=data.naming)
    store = SliceStore(store_url, mode="a")
    store.claim_profile(data.profile)
    log.info("found %d cases (%d refused on sight) -> %s", len(found.cases), len(found.problems), store_url)

    skipped, todo = ([], found.cases) if rehash else unchanged(store, found.cases, data.profile)
    log.info("%d cases unchanged since ingested, %d to read", len(skipped), len(todo))
    work = batches(todo, cases_per_task or batch_size(len(todo), cluster_threads()))
    futures = ingest_cases.map(work, store_url=store_url, profile=data.profile, dtype=data.dtype) if work else []
    with RunProgress(len(found.cases), "ingest-progress", "ingesting cases") as progress:
        progress.advance(len(skipped))
        done, failed = gather(futures, work, progress, weight=len)
    rows, quarantine = sort_out(found.problems, skipped + [row for batch in done for row in batch], failed)

    published = store.publish(data.split_ratios, data.split_seed, quarantine)  # from the store as it is now
    summary = {
        "store": store_url,
        "profile": data.profile,
        "ingested": sum(r["status"] == "ingested" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "quarantined": len(quarantine),
        "cases_in_store": published["cases"],
        "unlabelled": published["cases"] - published["labelled"],
        "split": {k: len(v) for k, v in published["split"].items()},
        "fingerprint": published["fingerprint"],
    }
    report.ingest(store_url, summary, rows, quarantine, shown)
    log.info("ingest summary: %s", summary)
    if quarantine:
        return Failed(
            message=f"{len(quarantine)} case(s) quarantined: " + "; ".join(q["reason"] for q in quarantine),
            data=summary,
        )
    return summary
