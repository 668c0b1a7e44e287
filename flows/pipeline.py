"""Flow ``pipeline``: a scheduled data-to-model run, ingest -> train -> evaluate as subflows.

Each section of its parameters is the same model the stage's own flow takes, so the pipeline's
form in the Prefect UI shows the same typed sections (data, network, training, prediction).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Failed

from flows.evaluate import evaluate
from flows.ingest import ingest
from flows.sections import documented, sections
from flows.train import train
from storage.registry import DEFAULT_ROOT
from storage.store import SliceStore
from tasks import report
from unet.config import TrainConfig
from unet.model import UNetConfig
from unet.predict import Prediction
from unet.preprocess import Preprocessing


@flow(name="pipeline", log_prints=True)
@documented
def pipeline(
    raw: list[str],
    store_url: str,
    registry_url: str = DEFAULT_ROOT,
    data: Preprocessing = Preprocessing(),
    network: UNetConfig = UNetConfig(),
    training: TrainConfig = TrainConfig(),
    evaluate_split: str = "test",
    prediction: Prediction = Prediction(),
    allow_quarantine: bool = True,
    recipe: str | None = None,
) -> dict:
    """Ingest -> train (one model, or a cross-validated ensemble) -> evaluate on raw BraTS data.

    Args:
        evaluate_split: split to evaluate the new model on: train, val, test or all
        allow_quarantine: go on training when some cases were quarantined
    """
    log = get_run_logger()
    data, network, training, prediction = sections(
        recipe, data=data, network=network, training=training, prediction=prediction
    )
    runs = {}
    runs["ingest"] = ingest(raw, store_url, data, return_state=True)
    summary = runs["ingest"].result(raise_on_failure=False)
    if not isinstance(summary, dict) or (runs["ingest"].is_failed() and not allow_quarantine):
        return _summary(runs, Failed(message=f"ingest: {runs['ingest'].message}"))
    if not SliceStore(store_url).split.get("train"):
        return _summary(runs, Failed(message=f"ingest left no training cases in {store_url}"))
    if runs["ingest"].is_failed():
        log.warning("going on without the quarantined cases: %s", runs["ingest"].message)

    runs["train"] = train(store_url, registry_url, network, training, fresh=True, return_state=True)
    trained = runs["train"].result()
    result = {"ingest": summary, "train": {k: trained[k] for k in ("version", "metrics", "best")}}
    if SliceStore(store_url).split.get(evaluate_split) or evaluate_split == "all":  # a held-out split to score
        runs["evaluate"] = evaluate(
            store_url, trained["version"], registry_url, evaluate_split, prediction, return_state=True
        )
        result["evaluate"] = runs["evaluate"].result()
    else:
        log.info("no %s split in %s: the model's figures are its cross-validation's", evaluate_split, store_url)
    return _summary(runs, result)


def _summary(runs: dict, result):
    """The pipeline run's own artifact (``tasks.report.pipeline``): each stage's outcome and links."""
    outcomes = {}
    for stage, state in runs.items():
        value = state.result(raise_on_failure=False)
        outcomes[stage] = _OUTCOME[stage](value) if isinstance(value, dict) else str(state.message or "")
    report.pipeline(runs, outcomes)
    return result


def _dice(result: dict) -> str:
    metrics = result.get("metrics", result)  # a training's result holds them under "metrics"
    return " ".join(f"{k} {metrics.get(f'dice_{k}', float('nan')):.3f}" for k in ("WT", "TC", "ET"))


_OUTCOME = {
    "ingest": lambda r: (
        f"{r['ingested']} ingested, {r['skipped']} skipped, {r['quarantined']} quarantined; split "
        f"{'/'.join(map(str, r['split'].values()))} ({'/'.join(r['split'])})"
    ),
    "train": lambda r: f"{r['version']}: {'cross-validated' if r.get('folds') else 'validation'} Dice {_dice(r)}",
    "evaluate": lambda r: f"{r['cases']} {r['split']} case(s), Dice {_dice(r)}",
}
