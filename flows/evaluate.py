"""Flow ``evaluate``: a registered model against a split of the slice store, with BraTS metrics.

resolve the model (default: best) -> the split's cases (warn on overlap with its training cases)
-> evaluate_stored_case mapped over a thread pool (full 3D volumes on the original grid)
-> summary per region (mean, median, std) -> overlays of the best and worst case
-> saved with the model version (info.json "evaluation", evaluation.json, PNGs) -> artifacts
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Failed
from prefect.utilities.annotations import unmapped

from flows.sections import documented, sections
from storage.registry import DEFAULT_ROOT
from storage.versions import ModelVersion
from tasks import report
from tasks.artifacts import RunProgress
from tasks.evaluate import evaluate_stored_case
from tasks.evaluation import cases_to_evaluate, keep_evaluation, overlays
from tasks.runners import case_threads, device_name, predict_runner
from tasks.stage import gather
from unet.predict import Prediction


@flow(name="evaluate", task_runner=predict_runner(), log_prints=True)
@documented
def evaluate(
    store_url: str,
    version: str | None = None,
    registry_url: str = DEFAULT_ROOT,
    split: str = "test",
    prediction: Prediction = Prediction(),
) -> dict:
    """A registered model against a split of the slice store: BraTS metrics per case on the original grids.

    Args:
        split: train, val, test or all
    """
    log = get_run_logger()
    (prediction,) = sections(prediction=prediction)
    shown = report.used(prediction=prediction)
    model = ModelVersion.resolve(registry_url, version)
    cases, overlap = cases_to_evaluate(store_url, model, split)
    device = device_name(prediction.device)
    log.info("model %s on %s: %d %s case(s) of %s", model.version, device, len(cases), split, store_url)

    run = dict(store_url=store_url, registry_url=registry_url, version=model.version, device=device, tta=prediction.tta)
    rule = model.info.postprocess if prediction.postprocess else None
    with case_threads(len(cases)), RunProgress(len(cases), "evaluate-progress", "evaluating cases") as progress:
        futures = evaluate_stored_case.map(cases, batch_size=prediction.batch_size, rule=unmapped(rule), **run)
        rows, failed = gather(futures, cases, progress)
        figures = overlays(rows, run)
    failures = [reason for _, reason in failed]
    record, result, summary = keep_evaluation(model, store_url, split, prediction, rows, failures, overlap, figures)
    report.evaluate(rows, summary, figures, record, result, shown)
    if failures:
        return Failed(message=f"{len(failures)} case(s) failed: " + "; ".join(failures), data=result)
    return result
