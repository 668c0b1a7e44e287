"""Prefect tasks: BraTS metrics of one stored case on its original grid, and a figure of one case.

The prediction comes from the store's slices through ``unet.predict.segment`` (the same code path
inference uses) and is restored to the case's original grid; the ground truth is the case's
original segmentation file, read with ``storage.nifti`` and checked against the sha256 recorded
at ingestion. If that file is gone (or changed), the store's label restored to the grid stands
in, and the row says so. Metrics: ``unet.metrics.evaluate_case`` with the case's voxel zooms.
"""

from __future__ import annotations

import time

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from storage.nifti import load_reference, sha256_file
from storage.store import SliceStore
from tasks.ingest import is_transient
from tasks.plots import overlay_png
from unet.metrics import evaluate_case
from unet.predict import cached_model, segment
from unet.preprocess import PROFILES, restore_grid, to_label_slices

NIFTI_TRUTH = "original seg"


def ground_truth(store: SliceStore, case_id: str) -> tuple[np.ndarray, str]:
    """(X, Y, Z) BraTS labels of a stored case on its original grid, and where they came from."""
    attrs = store.attrs(case_id)
    path = attrs["sources"].get("seg")
    why = "no seg file recorded"
    if path:
        try:
            if sha256_file(path) == attrs["sha256"]["seg"]:
                labels = np.asanyarray(load_reference(path).dataobj)
                if list(labels.shape) == attrs["shape"]:
                    return labels, NIFTI_TRUTH
                why = f"{path} has shape {labels.shape}, the case {attrs['shape']}"
            else:
                why = f"{path} changed since ingestion (sha256 differs)"
        except FileNotFoundError:
            why = f"{path} is gone"
    label = store.label(case_id)
    if label is None:
        raise ValueError(f"{case_id}: no ground truth ({why}) and no label in the store")
    classes = np.asarray(label[:])
    scores = np.moveaxis(np.eye(4, dtype=np.float32)[classes], -1, 1)  # (Z, 4, h, w) one-hot
    return restore_grid(scores, PROFILES[attrs["profile"]], attrs["shape"]), f"store label ({why})"


@task(
    name="evaluate-case",
    task_run_name="evaluate-{case_id}",
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=is_transient,
    cache_policy=NONE,
)
def evaluate_stored_case(
    case_id: str, store_url: str, models: str, version: str, device: str = "cpu", tta: bool = False, batch_size: int = 16
) -> dict:
    """All BraTS metrics of one case (regions WT/TC/ET and labels 1/2/4) as one table row."""
    start = time.perf_counter()
    store = SliceStore(store_url)
    attrs = store.attrs(case_id)
    model, _ = cached_model(models, version, device)
    pred = segment(model, store.image(case_id), attrs["profile"], attrs["shape"], attrs["slice_brain"], tta=tta, batch_size=batch_size)
    truth, source = ground_truth(store, case_id)
    metrics = evaluate_case(pred, truth, attrs["zooms"])
    return {
        "case": case_id,
        "grade": attrs.get("grade") or "",
        **{k: round(v, 4) for k, v in metrics.items()},
        "truth": source,
        "seconds": round(time.perf_counter() - start, 2),
    }


@task(name="overlay-case", task_run_name="overlay-{case_id}", cache_policy=NONE)
def overlay_case(case_id: str, store_url: str, models: str, version: str, title: str, device: str = "cpu", tta: bool = False) -> bytes:
    """PNG of the case's slice with the most tumour: truth and prediction on the store's grid.

    Only that slice is predicted; slices are independent, so it is the volume's prediction there.
    """
    store = SliceStore(store_url)
    attrs = store.attrs(case_id)
    profile = PROFILES[attrs["profile"]]
    tumour = attrs.get("slice_tumour") or attrs["slice_brain"]
    z = int(np.argmax(tumour))
    model, _ = cached_model(models, version, device)
    pred = segment(model, store.image(case_id), profile, attrs["shape"], attrs["slice_brain"], only=[z], tta=tta)
    pred_classes = to_label_slices(pred[:, :, z : z + 1], profile)[0]
    label = store.label(case_id)
    truth = np.asarray(label[z]) if label is not None else None
    return overlay_png(np.asarray(store.image(case_id)[z]), truth, pred_classes, f"{title}: {case_id}, slice {z}")
