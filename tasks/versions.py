"""A model version's life in the registry: opened before training, trained (``tasks/train.py``),
gathered into an ensemble, promoted to BEST.

* ``open_version`` runs *before* training, so every retry of ``train_model`` writes into the same
  version, and a restarted flow run finds the unfinished version (same store fingerprint, same
  model and training run, status ``training``) and continues it. A fold of a cross-validation is a
  version of its own, with the fold's split (``fold_split``).
* ``register_ensemble``: the version made of a cross-validation's fold versions.
* ``promote_if_best`` marks the version inference uses by default, when it beats the current one
  like for like (``storage.versions.promotion``).
"""

from __future__ import annotations

import platform

import numpy as np
import prefect
import torch
import zarr

from storage.registry import Registry
from storage.split import make_folds
from storage.store import SliceStore
from storage.versions import ModelVersion, listed, promotion
from tasks.stage import run_logger, stage_task
from unet.config import TrainConfig, same_run
from unet.model import UNetConfig


def package_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "prefect": prefect.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
    }


@stage_task("open-version")
def open_version(
    registry_url: str,
    store_url: str,
    network: UNetConfig,
    training: TrainConfig,
    fresh: bool = False,
    fold: int | None = None,
) -> tuple[str, int]:
    """(version, attempt): the newest unfinished version of this very run, reopened (its attempt counted
    in ``info.json``), or a new one (attempt 1). ``fold``: the version of fold ``fold`` of a
    cross-validation in ``training.folds`` folds (it trains on the others and validates on it); a
    complete one of the same run is reused (attempt 0: nothing to train) unless ``fresh``."""
    store = SliceStore(store_url)
    if not store.split.get("train"):
        raise ValueError(f"{store_url}: no train split in the store (run `brats ingest`)")
    model_cfg = network.model_dump()
    if not fresh:
        this_run = [
            info
            for info in listed(registry_url)
            if info.status in ("training", "complete" if fold is not None else "training")
            and info.store_fingerprint == store.fingerprint
            and info.fold == fold
            and same_run(network, training, info.model, info.train_config)
        ]
        if this_run:  # the newest (version ids made in the same second do not sort by time)
            info = max(this_run, key=lambda info: info.created)
            if info.status == "complete":
                return info.version, 0
            return info.version, ModelVersion(registry_url, info.version).reopen()
    opened = ModelVersion.open(
        registry_url,
        status="training",
        model=model_cfg,
        profile=store.profile,
        store=store_url,
        store_fingerprint=store.fingerprint,
        split=store.split if fold is None else fold_split(store, training, fold),
        fold=fold,
        train_config=training.model_dump(),
        packages=package_versions(),
    )
    return opened.version, 1


def fold_split(store: SliceStore, training: TrainConfig, fold: int) -> dict[str, list[str]]:
    """Fold ``fold`` of ``training.folds`` over the store's labelled cases outside its test split: train
    on the other folds, validate on this one (``storage.split.make_folds``: by patient, stratified by
    grade, or by site as ``training.fold_by`` says)."""
    cases, folds = store.split.get("train", []) + store.split.get("val", []), training.folds
    parts = make_folds({c: store.attrs(c).get("grade") for c in cases}, folds, training.seed, training.fold_by)
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: folds are numbered 0..{folds - 1}")
    return {"train": sorted(c for i, part in enumerate(parts) if i != fold for c in part), "val": parts[fold]}


@stage_task("plan-folds")
def plan_folds(store_url: str, training: TrainConfig) -> list[list[str]]:
    """The validation cases of each fold, checked before any fold starts: a missing store, no train
    split or fewer patients (sites) than folds fail here once, not in K fold runs."""
    store = SliceStore(store_url)
    if not store.split.get("train"):
        raise ValueError(f"{store_url}: no train split in the store (run `brats ingest`)")
    return [fold_split(store, training, i)["val"] for i in range(training.folds)]


@stage_task("register-ensemble")
def register_ensemble(registry_url: str, members: list[str], training: TrainConfig) -> str:
    """A version that is the ensemble of ``members`` (the K fold versions of one cross-validation, run
    with ``training``): no weights of its own; it predicts with the mean of their probabilities."""
    infos = [ModelVersion(registry_url, m).info for m in members]
    first = infos[0]
    return ModelVersion.open(
        registry_url,
        kind="ensemble",
        members=members,
        model=first.model,
        profile=first.profile,
        store=first.store,
        store_fingerprint=first.store_fingerprint,
        split={
            "train": sorted({c for i in infos for c in i.split["train"]}),
            "val": [],
            "folds": [i.split["val"] for i in infos],
        },
        train_config=training.model_dump(),
        packages=package_versions(),
    ).version


@stage_task("promote-if-best")
def promote_if_best(registry_url: str, version: str) -> bool:
    """Mark ``version`` BEST when it beats the current BEST like for like (``storage.versions.promotion``:
    per-case Dice on the cases both were scored on without training on them, above a floor)."""
    registry = Registry(registry_url)
    candidate, current = ModelVersion(registry, version), registry.best()
    try:
        best = ModelVersion(registry, current).info if current else None
    except FileNotFoundError:  # BEST points at a version that was deleted
        best = None
    promote, why = promotion(candidate.info, best)
    run_logger().info("%s %s: %s", version, "promoted to BEST" if promote else "not promoted", why)
    if promote:
        candidate.promote()
    return promote
