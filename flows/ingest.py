"""Flow ``ingest``: raw BraTS folders -> normalized axial slices in a Zarr store, in parallel on Dask.

discover cases -> set aside those unchanged since ingested (size, modification time) -> ingest_cases mapped
over Dask, a few cases a task (skip unchanged bytes, quarantine invalid) ->
patient-level split of the labelled cases + fingerprint -> artifacts (cases, quarantine, summary)
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.states import Failed
from pydantic import BaseModel, Field

from flows.dask_runner import cluster_threads, dask_runner
from flows.overrides import sections
from storage.nifti import Naming, discover
from storage.store import SliceStore
from tasks.artifacts import RunProgress, summary_markdown, table
from tasks.ingest import batch_size, batches, ingest_cases, unchanged
from tasks.preset import gather


class Preprocessing(BaseModel):
    """How raw scans become slices, and how cases are split by patient."""

    profile: Literal["full", "tp"] = Field(
        "full", description="full: whole 240×240 slices; tp: a 192×192 window over the brain, downsampled to 96×96"
    )
    naming: Naming = Field(
        "auto", description="file names: auto (per case), brats2019 (flair/t1/t1ce/t2) or brats2023 (t2f/t1n/t1c/t2w)"
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="slice dtype in the store")
    split_ratios: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="train/val/test shares of the labelled cases, by patient"
    )
    split_seed: int = Field(0, description="seed of the deterministic split")


@flow(name="ingest", task_runner=dask_runner(), log_prints=True)
def ingest(
    raw: list[str],
    store: str,
    data: Preprocessing = Preprocessing(),
    cases_per_task: int | None = None,
    rehash: bool = False,
) -> dict:
    """Raw BraTS folders -> normalized axial slices in a Zarr store, in parallel on Dask.

    Args:
        raw: raw roots in any BraTS layout ({HGG,LGG}/<case>/, <case>/) or case folders
        store: slice store: a local path or an fsspec URL (s3://…)
        data: preprocessing and split
        cases_per_task: cases per Prefect task run (each run costs ~0.07 s on Dask); default: two runs per Dask
            worker thread at least, 8 cases at most; 1: a run per case
        rehash: read and hash every file, even those whose size and modification time are as recorded
    """
    log = get_run_logger()
    (data,) = sections(data=data)
    found = discover(*raw, naming=data.naming)
    slices = SliceStore(store, mode="a")
    slices.claim_profile(data.profile)
    log.info("found %d cases (%d refused on sight) -> %s", len(found.cases), len(found.problems), store)

    skipped, todo = ([], found.cases) if rehash else unchanged(slices, found.cases, data.profile)
    log.info("%d cases unchanged since ingested, %d to read", len(skipped), len(todo))
    work = batches(todo, cases_per_task or batch_size(len(todo), cluster_threads()))
    futures = ingest_cases.map(work, store_url=store, profile=data.profile, dtype=data.dtype) if work else []
    with RunProgress(len(found.cases), "ingest-progress", "ingesting cases") as progress:
        progress.advance(len(skipped))
        done, failed = gather(futures, work, progress, weight=len)
    rows = skipped + [row for batch in done for row in batch]
    quarantine = [{"case": p.path, "reason": str(p)} for p in found.problems]
    quarantine += [{"case": r["case"], "reason": r["reason"]} for r in rows if r["status"] == "quarantined"]
    quarantine += [{"case": case.case_id, "reason": reason} for batch, reason in failed for case in batch]
    rows = [r for r in rows if r["status"] != "quarantined"]

    published = slices.publish(data.split_ratios, data.split_seed, quarantine)  # from the store as it is now
    summary = {
        "store": store,
        "profile": data.profile,
        "ingested": sum(r["status"] == "ingested" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "quarantined": len(quarantine),
        "cases_in_store": published["cases"],
        "unlabelled": published["cases"] - published["labelled"],
        "split": {k: len(v) for k, v in published["split"].items()},
        "fingerprint": published["fingerprint"],
    }
    table(sorted(rows, key=lambda r: r["case"]), "ingest-cases", "Cases this run ingested or skipped (unchanged)")
    table(quarantine or [{"case": "", "reason": "none"}], "ingest-quarantine", "Cases refused, with the reason")
    summary_markdown(
        f"Ingest → `{store}`",
        summary,
        "ingest-summary",
        "Ingest summary",
        failed=[q["reason"] for q in quarantine],
        failed_title="Quarantined",
    )
    log.info("ingest summary: %s", summary)
    if quarantine:
        return Failed(
            message=f"{len(quarantine)} case(s) quarantined: " + "; ".join(q["reason"] for q in quarantine),
            data=summary,
        )
    return summary
