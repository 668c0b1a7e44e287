"""Flow ``train``: slices in the store -> a trained U-Net (or a cross-validated ensemble) in the registry.

One model (``training.folds`` 0):

    check the device -> open (or reopen) a model version
    -> train_model (on a GPU tagged gpu; retries resume from its checkpoint)
    -> choose its post-processing on the validation cases (original grids, as the test is scored)
    -> promote the version to BEST when its validation Dice beats the current best
    -> announce it: the event ``brats.model.trained`` (version, store, registry), on which the
       ``evaluate/after-train`` deployment evaluates exactly that version

K-fold cross-validation (``training.folds`` K >= 2): the labelled cases outside the store's test
split are cut into K folds by patient (or site); fold i's model trains on the others (with the i-th of
``training.member_augment`` in turn, where the members take turns), and segments fold i
(its *out-of-fold* cases) on their original grids. Each fold is a run of this flow (``fold`` i): on
a server, runs of the same deployment, started together so that K workers take one each; on one
machine, subflows one after another. Then an **ensemble** version (the mean of the K models'
probabilities) is registered, its post-processing is chosen on every case's out-of-fold
segmentation, and the cross-validated scores (per case, per fold, pooled) become its metrics; it
is promoted and announced as one model is.

A flow run that was killed and is started again with the same store and the same parameters
continues the unfinished version from its last checkpoint (``fresh`` starts a new one), and a
cross-validation reuses the folds already finished; deployed, a crashed run is started again by an
automation. A version counts its attempts: after ``MAX_ATTEMPTS`` it is given up (status
``abandoned``) and the next run starts a new one.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.events import emit_event
from prefect.runtime import deployment, flow_run

from flows.sections import documented, sections
from storage.registry import DEFAULT_ROOT
from storage.versions import ModelVersion
from tasks import report
from tasks.evaluate import choose_postprocess, cross_validation, predict_out_of_fold
from tasks.stage import final_states
from tasks.train import train_model_on
from tasks.versions import open_version, plan_folds, promote_if_best, register_ensemble
from unet.config import TrainConfig
from unet.device import pick_device
from unet.model import UNetConfig

EVENT = "brats.model.trained"
MAX_ATTEMPTS = 3


@flow(name="train", log_prints=True)
@documented
def train(
    store_url: str,
    registry_url: str = DEFAULT_ROOT,
    network: UNetConfig = UNetConfig(),
    training: TrainConfig = TrainConfig(),
    fresh: bool = False,
    fold: int | None = None,
    recipe: str | None = None,
) -> dict:
    """Slices in the store -> a trained U-Net, or with training.folds K a cross-validated ensemble of K.

    Args:
        fresh: start a new version even if an unfinished one of the same run exists
        fold: train only this fold of a cross-validation (0..folds-1): what each fold's run does
    """
    log = get_run_logger()
    network, training = sections(recipe, network=network, training=training)
    shown = report.used(network=network, training=training)
    device = pick_device(training.device)  # a device that is not there fails here, at once, not after retries
    if training.folds and fold is None:
        return _cross_validate(store_url, registry_url, network, training, fresh, shown)
    if fold is not None and not training.folds:
        raise ValueError(f"fold {fold} given, but training.folds is 0: set the number of folds")
    if fold is not None:
        training = training.member(fold)  # members may take turns at the augmentation
    version, attempt = open_version(registry_url, store_url, network, training, fresh, fold)
    if attempt == 0:
        log.info("fold %d: version %s is already trained; reused", fold, version)
        return {"version": version, "fold": fold, "reused": True}
    if attempt > MAX_ATTEMPTS:
        ModelVersion(registry_url, version).abandon()
        raise ValueError(
            f"{version}: attempt {attempt} after {attempt - 1} that did not finish; abandoned, start afresh"
        )
    log.info("%s version %s in %s", f"continuing (attempt {attempt})" if attempt > 1 else "new", version, registry_url)
    summary = train_model_on(device)(store_url, registry_url, version, network, training)
    if fold is not None:  # a member of an ensemble: scored on its fold; the ensemble is chosen and promoted
        summary["out_of_fold"] = predict_out_of_fold(store_url, registry_url, version, str(device), training.batch_size)
        report.train(registry_url, version, summary, shown)
        return {**summary, "fold": fold}
    summary["postprocess"] = choose_postprocess(store_url, registry_url, version, str(device), training.batch_size)
    report.train(registry_url, version, summary, shown)
    best = promote_if_best(registry_url, version)
    log.info("%s: validation Dice %s%s", version, summary["metrics"], " — now BEST" if best else "")
    _announce(version, store_url, registry_url, best, summary["metrics"])
    return {**summary, "best": best}


def _cross_validate(
    store_url: str, registry_url: str, network: UNetConfig, training: TrainConfig, fresh: bool, shown: list[str]
) -> dict:
    log = get_run_logger()
    start = time.perf_counter()
    for i, cases in enumerate(plan_folds(store_url, training)):
        log.info("fold %d (by %s) validates %d case(s): %s", i, training.fold_by, len(cases), ", ".join(cases))
    members = _run_folds(store_url, registry_url, network, training, fresh)
    version = register_ensemble(registry_url, members, training)
    cv = cross_validation(store_url, registry_url, version)
    metrics = cv["metrics"]
    summary = {
        "version": version,
        "registry": registry_url,
        "members": members,
        "folds": training.folds,
        "metrics": metrics,
        "postprocess": cv["postprocess"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    ModelVersion(registry_url, version).record_seconds(summary["seconds"])
    report.cross_validation(version, cv, training.folds, shown)
    best = promote_if_best(registry_url, version)
    log.info("%s: cross-validated Dice %s%s", version, metrics, " — now BEST" if best else "")
    _announce(version, store_url, registry_url, best, metrics)
    return {**summary, "best": best}


def _run_folds(store_url: str, registry_url: str, network: UNetConfig, training: TrainConfig, fresh: bool) -> list[str]:
    """The K fold versions, in fold order: deployed, K runs of this deployment at once; else subflows."""
    name = deployment.name
    params = {
        "store_url": store_url,
        "registry_url": registry_url,
        "network": network,
        "training": training,
        "fresh": fresh,
    }
    if not name:
        return [train(**params, fold=i)["version"] for i in range(training.folds)]
    runs = [
        run_deployment(f"{flow_run.flow_name}/{name}", parameters={**params, "fold": i}, timeout=0)
        for i in range(training.folds)
    ]
    get_run_logger().info("folds started as runs of %s/%s: %s", flow_run.flow_name, name, [r.name for r in runs])
    states = final_states(runs)
    failed = [f"fold {i}: {s.name} {s.message or ''}".strip() for i, s in enumerate(states) if not s.is_completed()]
    if failed:
        raise RuntimeError("cross-validation folds did not complete: " + "; ".join(failed))
    return [
        open_version.fn(registry_url, store_url, network, training.member(i), False, i)[0]
        for i in range(training.folds)
    ]


def _announce(version: str, store_url: str, registry_url: str, best: bool, metrics: dict) -> None:
    emit_event(
        EVENT,
        resource={
            "prefect.resource.id": f"brats.model.{version}",
            "prefect.resource.name": version,
            "brats.evaluate": str(flow_run.parent_flow_run_id is None).lower(),  # a pipeline evaluates its own
        },
        payload={
            "version": version,
            "store_url": store_url,
            "registry_url": registry_url,
            "best": best,
            "metrics": metrics,
        },
    )
