"""Flow ``train``: slices in the store -> a trained U-Net as a new version in the model registry.

    check the device -> open (or reopen) a model version
    -> train_model (tag gpu; retries resume from its checkpoint)
    -> choose its post-processing on the validation cases (original grids, as the test is scored)
    -> promote the version to BEST when its validation Dice beats the current best
    -> announce it: the event ``brats.model.trained`` (version, store, registry), on which the
       ``evaluate/after-train`` deployment evaluates exactly that version

A flow run that was killed and is started again with the same store and the same parameters
continues the unfinished version from its last checkpoint (``fresh`` starts a new one); deployed,
a crashed run is started again by an automation. The version counts its attempts: after
``MAX_ATTEMPTS`` it is given up (status ``abandoned``) and the next run starts a new one.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.runtime import flow_run

from flows.overrides import deployment_defaults
from storage.registry import DEFAULT_ROOT, Registry
from tasks.evaluate import choose_postprocess
from tasks.train import artifacts, open_version, promote_if_best, train_model
from unet.device import pick_device
from unet.model import UNetConfig
from unet.train import TrainConfig

EVENT = "brats.model.trained"
MAX_ATTEMPTS = 3


@flow(name="train", log_prints=True)
def train(
    store: str,
    models: str = DEFAULT_ROOT,
    network: UNetConfig = UNetConfig(),
    training: TrainConfig = TrainConfig(),
    fresh: bool = False,
) -> dict:
    """Slices in the store -> a trained U-Net as a new version in the model registry.

    Args:
        store: slice store (local path or fsspec URL) with a train/val split
        models: model registry root (env BRATS_MODELS)
        network: the U-Net
        training: the training run
        fresh: start a new version even if an unfinished one of the same run exists
    """
    log = get_run_logger()
    network, training = deployment_defaults(network=network, training=training)
    device = pick_device(training.device)  # a device that is not there fails here, at once, not after retries
    version, attempt = open_version(models, store, network, training, fresh)
    if attempt > MAX_ATTEMPTS:
        Registry(models).update_info(version, status="abandoned")
        raise ValueError(
            f"{version}: attempt {attempt} after {attempt - 1} that did not finish; abandoned, start afresh"
        )
    log.info("%s version %s in %s", f"continuing (attempt {attempt})" if attempt > 1 else "new", version, models)
    summary = train_model(store, models, version, network, training)
    summary["postprocess"] = choose_postprocess(store, models, version, str(device))
    artifacts(models, version, summary, network, training)
    best = promote_if_best(models, version)
    log.info("%s: validation Dice %s%s", version, summary["metrics"], " — now BEST" if best else "")
    emit_event(
        EVENT,
        resource={
            "prefect.resource.id": f"brats.model.{version}",
            "prefect.resource.name": version,
            "brats.evaluate": str(flow_run.parent_flow_run_id is None).lower(),  # a pipeline evaluates its own
        },
        payload={"version": version, "store": store, "models": models, "best": best, "metrics": summary["metrics"]},
    )
    return {**summary, "best": best}
