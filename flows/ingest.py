"""Flow ``ingest``: raw BraTS folders -> normalized axial slices in a Zarr store, in parallel on Dask.

    discover cases -> ingest_case mapped over Dask (skip unchanged, quarantine invalid) ->
    patient-level split + fingerprint -> artifacts (cases, quarantine, summary)
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.states import Failed
from pydantic import BaseModel, Field

from flows.dask_runner import dask_runner
from flows.report import report
from storage.nifti import NAMINGS, Naming, discover
from storage.store import SliceStore, make_split
from tasks.artifacts import RunProgress, markdown, table
from tasks.ingest import ingest_case


class IngestParams(BaseModel):
    """Parameters of an ingestion run (rendered as a form in the Prefect UI)."""

    raw: list[str] = Field(description="Raw roots in the BraTS layout ({HGG,LGG}/<case>/ or <case>/)", min_length=1)
    store: str = Field(description="Slice store: a local path or an fsspec URL (s3://…)")
    profile: Literal["full", "tp"] = Field("full", description="full: 240×240 slices; tp: crop 192, downsample → 96×96")
    naming: Naming = Field("auto", description="file names: auto (per case), brats2019 (flair/t1/t1ce/t2) or brats2023 (t2f/t1n/t1c/t2w)")
    dtype: Literal["float16", "float32"] = "float16"
    split_ratios: tuple[float, float, float] = Field((0.7, 0.15, 0.15), description="train/val/test, by patient")
    split_seed: int = 0


@flow(name="ingest", task_runner=dask_runner(), log_prints=True)
def ingest(params: IngestParams) -> dict:
    log = get_run_logger()
    found = discover(*params.raw, naming=params.naming)
    store = SliceStore(params.store, mode="a")
    store.claim_profile(params.profile)
    log.info("found %d cases (%d refused on sight) -> %s", len(found.cases), len(found.problems), params.store)

    rows, quarantine = [], [{"case": p.path, "reason": str(p)} for p in found.problems]
    futures = ingest_case.map(found.cases, store_url=params.store, profile=params.profile, dtype=params.dtype)
    by_future = dict(zip(futures, found.cases))
    with RunProgress(len(futures), "ingest-progress", "ingesting cases") as progress:
        for future in as_completed(futures):
            try:
                rows.append(future.result())
            except Exception as exc:  # the task's own error: invalid data, or I/O after its retries
                quarantine.append({"case": by_future[future].case_id, "reason": str(exc)})
                log.error("quarantined %s", exc)
            progress.advance()

    rows.sort(key=lambda r: r["case"])
    attrs = {c: store.attrs(c) for c in store.case_ids()}
    labelled = {c: a.get("grade") for c, a in attrs.items() if a.get("slice_tumour") is not None}
    split = make_split(labelled, params.split_ratios, params.split_seed)  # unlabelled scans are never trained on
    fingerprint = store.publish(split, quarantine)
    summary = {
        "store": params.store,
        "profile": params.profile,
        "ingested": sum(r["status"] == "ingested" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "quarantined": len(quarantine),
        "cases_in_store": len(attrs),
        "unlabelled": len(attrs) - len(labelled),
        "split": {k: len(v) for k, v in split.items()},
        "fingerprint": fingerprint,
    }
    _artifacts(rows, quarantine, summary)
    log.info("ingest summary: %s", summary)
    if quarantine:
        return Failed(message=f"{len(quarantine)} case(s) quarantined: " + "; ".join(q["reason"] for q in quarantine), data=summary)
    return summary


def _artifacts(rows: list[dict], quarantine: list[dict], summary: dict) -> None:
    table(rows, "ingest-cases", "Cases this run ingested or skipped (unchanged)")
    table(quarantine or [{"case": "", "reason": "none"}], "ingest-quarantine", "Cases refused, with the reason")
    lines = [f"# Ingest → `{summary['store']}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items() if k != "store"]
    if quarantine:
        lines += ["", "## Quarantined", ""] + [f"- {q['reason']}" for q in quarantine]
    markdown("\n".join(lines), "ingest-summary", "Ingest summary")


def add_command(sub) -> None:
    p = sub.add_parser("ingest", help="raw BraTS folders -> normalized slices in a Zarr store (Dask)")
    p.add_argument("raw", nargs="+", help="raw root(s) in the BraTS layout")
    p.add_argument("--store", required=True, help="slice store path or fsspec URL")
    p.add_argument("--profile", choices=["full", "tp"], default="full")
    p.add_argument("--naming", choices=NAMINGS, default="auto")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--split", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--dask-address", default=None, help="existing Dask scheduler (default: a LocalCluster)")
    p.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes (default: cores)")
    p.set_defaults(run=run_cli)


def run_cli(args) -> int:
    params = IngestParams(raw=args.raw, store=args.store, profile=args.profile, naming=args.naming, dtype=args.dtype, split_ratios=tuple(args.split))
    runner = dask_runner(args.dask_address, args.workers)
    state = ingest.with_options(task_runner=runner)(params, return_state=True)
    return report(state)
