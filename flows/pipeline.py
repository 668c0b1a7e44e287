"""Flow ``pipeline``: a scheduled data-to-model run, ingest -> train -> evaluate as subflows.

Each section of its parameters is the same model the stage's own flow takes, so the pipeline's
form in the Prefect UI shows the same typed sections (data, network, training, prediction).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Failed

from flows.evaluate import evaluate
from flows.infer import Prediction
from flows.ingest import Preprocessing, ingest
from flows.overrides import sections
from flows.train import train
from storage.registry import DEFAULT_ROOT
from storage.store import SliceStore
from tasks.artifacts import markdown
from unet.model import UNetConfig
from unet.train import TrainConfig


@flow(name="pipeline", log_prints=True)
def pipeline(
    raw: list[str],
    store: str,
    models: str = DEFAULT_ROOT,
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
        raw: raw roots in any BraTS layout ({HGG,LGG}/<case>/, <case>/) or case folders
        store: slice store: a local path or an fsspec URL
        models: model registry: a local path or an fsspec URL
        data: preprocessing and split
        network: the U-Net
        training: the training run
        evaluate_split: split to evaluate the new model on: train, val, test or all
        prediction: how the evaluated cases are segmented
        allow_quarantine: go on training when some cases were quarantined
        recipe: start from a named recipe's data, network and training (paper, cpu, gpu); fields given still apply
    """
    log = get_run_logger()
    data, network, training, prediction = sections(
        recipe, data=data, network=network, training=training, prediction=prediction
    )
    runs = {}
    runs["ingest"] = ingest(raw, store, data, return_state=True)
    summary = runs["ingest"].result(raise_on_failure=False)
    if not isinstance(summary, dict) or (runs["ingest"].is_failed() and not allow_quarantine):
        return _summary(runs, Failed(message=f"ingest: {runs['ingest'].message}"))
    if not SliceStore(store).split.get("train"):
        return _summary(runs, Failed(message=f"ingest left no training cases in {store}"))
    if runs["ingest"].is_failed():
        log.warning("going on without the quarantined cases: %s", runs["ingest"].message)

    runs["train"] = train(store, models, network, training, fresh=True, return_state=True)
    trained = runs["train"].result()
    result = {"ingest": summary, "train": {k: trained[k] for k in ("version", "metrics", "best")}}
    if SliceStore(store).split.get(evaluate_split) or evaluate_split == "all":  # a held-out split to score
        runs["evaluate"] = evaluate(store, trained["version"], models, evaluate_split, prediction, return_state=True)
        result["evaluate"] = runs["evaluate"].result()
    else:
        log.info("no %s split in %s: the model's figures are its cross-validation's", evaluate_split, store)
    return _summary(runs, result)


def _summary(runs: dict, result):
    """The pipeline run's own artifact: each stage's outcome, with a link to its run (and its artifacts)."""
    from prefect.settings import PREFECT_UI_URL

    ui = (PREFECT_UI_URL.value() or "").rstrip("/")
    lines = ["# Pipeline", "", "| stage | run | state | outcome |", "|---|---|---|---|"]
    for stage, state in runs.items():
        value = state.result(raise_on_failure=False)
        outcome = (
            {
                "ingest": lambda r: (
                    f"{r['ingested']} ingested, {r['skipped']} skipped, {r['quarantined']} quarantined; "
                    f"split {r['split']}"
                ),
                "train": lambda r: (
                    f"`{r['version']}`, {'cross-validated' if r.get('folds') else 'validation'} Dice "
                    + ", ".join(f"{k} {r['metrics'][f'dice_{k}']:.3f}" for k in ("WT", "TC", "ET"))
                ),
                "evaluate": lambda r: (
                    f"{r['cases']} {r['split']} case(s), Dice "
                    + ", ".join(f"{k} {r.get(f'dice_{k}', float('nan')):.3f}" for k in ("WT", "TC", "ET"))
                ),
            }[stage](value)
            if isinstance(value, dict)
            else str(state.message or "")
        )
        run_id = state.state_details.flow_run_id
        lines.append(
            f"| {stage} | [{stage} run]({ui}/runs/flow-run/{run_id}?tab=Artifacts) | {state.name} | {outcome} |"
        )
    lines += ["", "Each stage's own tables and plots are on its run's *Artifacts* tab (the links above)."]
    markdown("\n".join(lines), "pipeline-summary", "The pipeline's stages, with links to their runs and artifacts")
    return result
