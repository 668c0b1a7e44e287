"""Flow ``infer``: new BraTS scans -> segmentations on their own grid, with tumour volumes.

resolve the model (default: best) -> discover cases (roots or single case folders) ->
infer_case mapped over a thread pool (skip done, one-line error for a bad scan) ->
artifacts (cases with volumes, summary); Failed, naming every bad scan, if any failed
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.states import Failed
from pydantic import BaseModel, Field

from flows.overrides import sections
from storage.nifti import Naming, discover
from storage.registry import DEFAULT_ROOT, Registry
from tasks.artifacts import RunProgress, summary_markdown, table
from tasks.infer import case_threads, device_name, infer_case, predict_runner
from tasks.preset import gather


class Prediction(BaseModel):
    """How scans are segmented (the same for evaluation, inference and the inbox sweep)."""

    tta: bool = Field(
        True,
        description="mirror test-time augmentation: the mean with the left-right mirror (2x the compute)",
    )
    postprocess: bool = Field(
        True,
        description="apply the model's post-processing (chosen on its validation cases); off: the network's raw output",
    )
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    batch_size: int = Field(16, ge=1, description="slices per forward pass")


@flow(name="infer", task_runner=predict_runner(), log_prints=True)
def infer(
    inputs: list[str],
    out: str,
    model: str | None = None,
    models: str = DEFAULT_ROOT,
    naming: Naming = "auto",
    et_label: Literal[3, 4] | None = None,
    prediction: Prediction = Prediction(),
) -> dict:
    """New BraTS scans -> segmentations on their own grid (<out>/<case>_seg.nii.gz) with tumour volumes (<case>.json).

    Args:
        inputs: scans in a BraTS layout: roots ({HGG,LGG}/<case>/ or <case>/) or case folders; no seg needed
        out: output folder
        model: model version, 'latest', or empty for the best
        models: model registry: a local path or an fsspec URL
        naming: file names: auto (per case), brats2019 (flair/t1/t1ce/t2) or brats2023 (t2f/t1n/t1c/t2w)
        et_label: label written for enhancing tumour: 4 (BraTS up to 2021) or 3 (2023+); empty: each input's own edition
        prediction: how scans are segmented
    """
    log = get_run_logger()
    (prediction,) = sections(prediction=prediction)
    registry = Registry(models)
    version = registry.resolve(model)
    profile = registry.info(version)["profile"]
    found = discover(*inputs, naming=naming)
    device = device_name(prediction.device)
    log.info("model %s (profile %s) on %s: %d case(s) -> %s", version, profile, device, len(found.cases), out)

    with (
        case_threads(len(found.cases)),
        RunProgress(len(found.cases), "infer-progress", "segmenting scans") as progress,
    ):
        futures = infer_case.map(
            found.cases,
            out=out,
            models=models,
            version=version,
            device=device,
            tta=prediction.tta,
            batch_size=prediction.batch_size,
            et_label=et_label,
            postprocess=prediction.postprocess,
        )
        rows, failed = gather(futures, found.cases, progress)
    failures = [str(p) for p in found.problems] + [reason for _, reason in failed]

    rows.sort(key=lambda r: r["case"])
    summary = {
        "out": out,
        "model": version,
        "profile": profile,
        "tta": prediction.tta,
        "postprocess": prediction.postprocess,
        "written": sum(r["status"] == "written" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "failed": len(failures),
    }
    table(rows or [{"case": "", "status": "no cases"}], "infer-cases", "Segmented scans with tumour volumes (ml)")
    volumes = ["", "| case | WT ml | TC ml | ET ml | status |", "|---|---:|---:|---:|---|"]
    volumes += [
        f"| {r['case']} | {r['WT_ml']:.1f} | {r['TC_ml']:.1f} | {r['ET_ml']:.1f} | {r['status']} |" for r in rows
    ]
    summary_markdown(
        f"Inference → `{out}`",
        summary,
        "infer-summary",
        "Inference summary",
        failed=failures,
        more=volumes if rows else [],
    )
    if failures:
        return Failed(message=f"{len(failures)} scan(s) failed: " + "; ".join(failures), data=summary)
    return summary
