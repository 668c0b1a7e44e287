"""Flow ``infer``: new BraTS scans -> segmentations on their own grid, with tumour volumes.

resolve the model (default: best) -> discover cases (roots or single case folders) ->
infer_case mapped over a thread pool (skip done, one-line error for a bad scan) ->
artifacts (cases with volumes, summary); Failed, naming every bad scan, if any failed
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.states import Failed
from prefect.utilities.annotations import unmapped

from flows.sections import documented, sections
from storage.cases import Naming, discover
from storage.registry import DEFAULT_ROOT
from storage.versions import ModelVersion
from tasks import report
from tasks.artifacts import RunProgress
from tasks.infer import announce_reviews, infer_case, keep_failures, summarize
from tasks.runners import case_threads, device_name, predict_runner
from tasks.stage import gather
from unet.predict import Prediction


def _run_name() -> str:
    """``infer-<case folder>`` (a triggered run segments one), ``infer-<folder>-and-N-more`` for several."""
    from prefect.runtime import flow_run

    names = [Path(p).name for p in flow_run.parameters.get("inputs") or []] or ["nothing"]
    return f"infer-{names[0]}" + (f"-and-{len(names) - 1}-more" if len(names) > 1 else "")


@flow(name="infer", flow_run_name=_run_name, task_runner=predict_runner(), log_prints=True)
@documented
def infer(
    inputs: list[str],
    out: str,
    version: str | None = None,
    registry_url: str = DEFAULT_ROOT,
    naming: Naming = "auto",
    et_label: Literal[3, 4] | None = None,
    prediction: Prediction = Prediction(),
) -> dict:
    """New BraTS scans -> segmentations on their own grid (<out>/<case>_seg.nii.gz) with tumour volumes (<case>.json).

    Args:
        inputs: scans in a BraTS layout: roots ({HGG,LGG}/<case>/ or <case>/) or case folders; no seg needed
    """
    log = get_run_logger()
    (prediction,) = sections(prediction=prediction)
    shown = report.used(prediction=prediction)
    model = ModelVersion.resolve(registry_url, version)
    version, profile = model.version, model.info.profile
    found = discover(*inputs, naming=naming)
    device = device_name(prediction.device)
    log.info("model %s (profile %s) on %s: %d case(s) -> %s", version, profile, device, len(found.cases), out)

    with (
        case_threads(len(found.cases)),
        RunProgress(len(found.cases), "infer-progress", "segmenting scans") as progress,
    ):
        run = dict(out=out, registry_url=registry_url, version=version, et_label=et_label)
        on_device = unmapped(prediction.model_copy(update={"device": device}))  # a model is iterable: not mapped
        futures = infer_case.map(found.cases, prediction=on_device, **run)
        rows, failed = gather(futures, found.cases, progress)
    keep_failures(failed, out, version)
    failures = [str(p) for p in found.problems] + [reason for _, reason in failed]
    summary = summarize(rows, failures, out, model, prediction)
    announce_reviews(rows, out)
    report.infer(out, summary, rows, failures, shown)
    if failures:
        return Failed(message=f"{len(failures)} scan(s) failed: " + "; ".join(failures), data=summary)
    return summary
