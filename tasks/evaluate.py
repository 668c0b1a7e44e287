"""Prefect tasks: BraTS metrics of one stored case on its original grid, a figure of one case, the
choice of a model's post-processing on its held-out cases, out-of-fold predictions and the
cross-validation, and the calibration of the quality estimate on them.

The prediction comes from the store's slices through ``unet.predict.predict_volume`` (the code path
inference uses) and is restored to the case's original grid; the ground truth is the case's
original segmentation file, read with ``storage.nifti`` and checked against the sha256 recorded
at ingestion. If that file is gone (or changed), the store's label restored to the grid stands
in, and the row says so. Metrics: ``unet.metrics.evaluate_case`` with the case's voxel zooms.
"""

from __future__ import annotations

import io
import time
from dataclasses import replace

import numpy as np
from prefect import get_run_logger

from storage.cases import InvalidCase
from storage.nifti import read_labels
from storage.registry import Registry
from storage.store import SliceStore
from storage.versions import ModelVersion, Score
from tasks.figures import overlay_png
from tasks.stage import stage_task
from unet import quality
from unet.checkpoint import cached_model, load_model
from unet.geometry import Geometry, to_labels
from unet.metrics import REGIONS, evaluate_case, summarize
from unet.outputs import labels_of
from unet.postprocess import PostProcess, best_postprocess, scores
from unet.predict import predict_slices, predict_volume, volumes_ml
from unet.quality import Evidence

NIFTI_TRUTH = "original seg"


def ground_truth(store: SliceStore, case_id: str) -> tuple[np.ndarray, str]:
    """(X, Y, Z) BraTS labels of a stored case on its original grid, and where they came from."""
    attrs = store.attrs(case_id)
    path = attrs["sources"].get("seg")
    why = "no seg file recorded"
    if path:
        try:
            return read_labels(path, attrs["edition"], sha256=attrs["sha256"]["seg"]), NIFTI_TRUTH
        except FileNotFoundError:
            why = f"{path} is gone"
        except InvalidCase as e:
            why = str(e)
    label = store.label(case_id)
    if label is None:
        raise ValueError(f"{case_id}: no ground truth ({why}) and no label in the store")
    geometry = Geometry.from_dict(attrs["geometry"])
    if label.shape[-2:] != geometry.slice_shape:  # labels kept at the window's resolution (profile tp)
        geometry = replace(geometry, factor=1)
    one_hot = np.moveaxis(np.eye(4, dtype=np.float32)[np.asarray(label[:])], -1, 1)  # (Z, 4, h, w)
    return to_labels(geometry, geometry.restore(one_hot)), f"store label ({why})"


def predict_stored_case(
    store: SliceStore, case_id: str, model, tta: bool, batch_size: int, evidence: Evidence | None = None
) -> np.ndarray:
    """The model's labels for a stored case on its original grid, before post-processing; ``evidence``
    gathers what its quality estimate is built from (``unet.quality``)."""
    attrs = store.attrs(case_id)
    slices, geometry, brain = store.image(case_id), attrs["geometry"], attrs["slice_brain"]
    return predict_volume(model, slices, geometry, brain, tta=tta, batch_size=batch_size, evidence=evidence)


@stage_task("evaluate-case", "evaluate-{case_id}")
def evaluate_stored_case(
    case_id: str,
    store_url: str,
    registry_url: str,
    version: str,
    device: str,
    tta: bool,
    batch_size: int,
    rule: dict | None = None,
) -> dict:
    """All BraTS metrics of one case (regions WT/TC/ET and labels 1/2/4) as one table row;
    ``rule``: a ``PostProcess`` as a dict (the model's), None for the raw output."""
    start = time.perf_counter()
    store = SliceStore(store_url)
    attrs = store.attrs(case_id)
    model, info = cached_model(registry_url, version, device)
    evidence = Evidence()
    pred = PostProcess.from_dict(rule).apply(
        predict_stored_case(store, case_id, model, tta, batch_size, evidence), attrs["zooms"]
    )
    truth, source = ground_truth(store, case_id)
    metrics = evaluate_case(pred, truth, attrs["zooms"])
    features = evidence.features()
    est, reasons = quality.assess(features, volumes_ml(pred, attrs["zooms"]), info.quality)
    return {
        "case": case_id,
        "grade": attrs.get("grade") or "",
        **{k: round(v, 4) for k, v in metrics.items()},
        **{f"est_{r}": v for r, v in est.items()},
        "review": bool(reasons),
        "review_reasons": reasons,
        "truth": source,
        "seconds": round(time.perf_counter() - start, 2),
    }


@stage_task("overlay-case", "overlay-{case_id}")
def overlay_case(
    case_id: str, store_url: str, registry_url: str, version: str, title: str, device: str, tta: bool
) -> bytes:
    """PNG of the case's slice with the most tumour: truth and prediction on the store's grid.

    Only that slice is predicted; slices are independent, so it is the volume's prediction there.
    """
    store = SliceStore(store_url)
    attrs = store.attrs(case_id)
    tumour = attrs.get("slice_tumour") or attrs["slice_brain"]
    z = int(np.argmax(tumour))
    model, _ = cached_model(registry_url, version, device)
    image = np.asarray(store.image(case_id)[z : z + 1], dtype=np.float32)
    pred = labels_of(predict_slices(model, image, tta), model.cfg.outputs)[0]
    label = store.label(case_id)
    f = label.shape[-1] // image.shape[-1] if label is not None else 1  # finer labels: on the slices' grid
    truth = np.asarray(label[z])[::f, ::f] if label is not None else None
    return overlay_png(image[0], truth, pred, f"{title}: {case_id}, slice {z}")


@stage_task("predict-out-of-fold", "predict-out-of-fold-{version}")
def predict_out_of_fold(
    store_url: str, registry_url: str, version: str, device: str, batch_size: int, tta: bool = True
) -> list[dict]:
    """A fold model's raw segmentations of its validation cases (the fold it never trained on), on
    their original grids: kept with the version (``oof-<case>.npz``) for the ensemble's choice of
    post-processing, and scored (BraTS metrics per case, recorded as ``out_of_fold``)."""
    store, registry = SliceStore(store_url), Registry(registry_url)
    model, info = load_model(registry, version, device)
    rows = []
    for case_id in info.split["val"]:
        evidence = Evidence()
        pred = predict_stored_case(store, case_id, model, tta, batch_size, evidence)
        registry.put(version, OUT_OF_FOLD.format(case=case_id), _npz(pred))
        truth, source = ground_truth(store, case_id)
        metrics = evaluate_case(pred, truth, store.attrs(case_id)["zooms"])
        row = {"case": case_id, "fold": info.fold, **_brief(metrics), "truth": source}
        rows.append({**row, "features": evidence.features()})
    ModelVersion(registry, version).record_out_of_fold(rows)
    return rows


OUT_OF_FOLD = "oof-{case}.npz"


def _npz(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, labels=labels)
    return buf.getvalue()


def _brief(metrics: dict) -> dict:
    """The region metrics of a case (Dice, HD95, sensitivity of WT, TC, ET), rounded for tables."""
    return {
        k: round(v, 4) for k, v in metrics.items() if k[: k.index("_")] in ("dice", "hd95", "sens") and "_L" not in k
    }


@stage_task("choose-postprocess", "choose-postprocess-{version}")
def choose_postprocess(
    store_url: str, registry_url: str, version: str, device: str, batch_size: int, tta: bool = True
) -> dict:
    """Choose the version's post-processing on its validation cases, scored on their original grids as
    the test is, and record it with the version (``postprocess``); evaluation and inference
    apply it from there."""
    store, registry = SliceStore(store_url), Registry(registry_url)
    model, info = load_model(registry, version, device)
    cases, ids, features = [], info.split["val"], []
    for case_id in ids:
        truth, _ = ground_truth(store, case_id)
        evidence = Evidence()
        pred = predict_stored_case(store, case_id, model, tta, batch_size, evidence)
        cases.append((pred, truth, store.attrs(case_id)["zooms"]))
        features.append(evidence.features())
    choice = _choose(version, cases, "validation")
    post = PostProcess.from_dict(choice["postprocess"])
    rows = []
    for case_id, f, (pred, truth, zooms) in zip(ids, features, cases):
        final = post.apply(pred, zooms)  # once per case: scored, and its volumes for the plausibility check
        rows.append(
            {
                "case": case_id,
                **_brief(evaluate_case(final, truth, zooms)),
                "features": f,
                "truth_WT_ml": _ml(truth, (1, 2, 4), zooms),
                "volumes_ml": volumes_ml(final, zooms),
            }
        )
    version_ = ModelVersion(registry, version)
    version_.record_postprocess(choice["postprocess"], choice["record"], Score.of("validation", rows) if rows else None)
    if rows:
        version_.record_quality(_calibrate(rows, "validation"))
    return choice["summary"]


def _calibrate(rows: list[dict], on: str) -> dict:
    """The quality estimate's calibration on these held-out cases (rows with ``features``, Dice,
    ``truth_WT_ml`` and ``volumes_ml``), and how its leave-one-out estimates track their Dice."""
    cases = quality.cases_of(rows)
    held = quality.held_out(cases)
    for row, h in zip(rows, held):
        row.update({f"est_{k}": v for k, v in h["quality"].items()}, review=bool(h["reasons"]))
    calibration = {**quality.fit(cases), "on": on, "held_out": quality.agreement(cases, held)}
    get_run_logger().info("%s: quality estimate calibrated on %d %s case(s): %s", on, len(cases), on, calibration)
    return calibration


def _choose(version: str, cases: list, on: str) -> dict:
    """The post-processing chosen on ``cases``, its record for the version, and a summary."""
    post, tried = best_postprocess(cases)
    (dice_before, hd_before), (dice_after, hd_after) = scores(cases, PostProcess()), scores(cases, post)
    choice = {
        "cases": len(cases),
        "on": on,
        "mean_dice_before": round(dice_before, 5),
        "mean_dice_after": round(dice_after, 5),
        "mean_hd95_before": round(hd_before, 3),
        "mean_hd95_after": round(hd_after, 3),
        "tried": tried,
    }
    get_run_logger().info(
        "%s: post-processing %s chosen on %d %s case(s): mean Dice %.4f -> %.4f, HD95 %.1f -> %.1f mm",
        version,
        post.to_dict(),
        len(cases),
        on,
        dice_before,
        dice_after,
        hd_before,
        hd_after,
    )
    summary = {"postprocess": post.to_dict(), **{k: v for k, v in choice.items() if k.startswith("mean_")}}
    return {"postprocess": post.to_dict(), "record": choice, "summary": summary}


@stage_task("cross-validation", "cross-validation-{version}")
def cross_validation(store_url: str, registry_url: str, version: str) -> dict:
    """An ensemble's cross-validated estimate, from its members' out-of-fold segmentations: the
    post-processing chosen on all of them (every labelled case, each scored by the model that never
    saw it), then every case scored with it (``cv.per_case``), per fold and pooled (mean, median,
    worst); the pooled means become the version's ``metrics``."""
    store, registry = SliceStore(store_url), Registry(registry_url)
    ensemble = ModelVersion(registry, version)
    members = ensemble.info.members
    cases, folds = [], []
    for fold, member in enumerate(members):
        for case_id in ModelVersion(registry, member).info.split["val"]:
            with np.load(io.BytesIO(registry.get(member, OUT_OF_FOLD.format(case=case_id)))) as f:
                pred = f["labels"]
            truth, _ = ground_truth(store, case_id)
            cases.append((pred, truth, store.attrs(case_id)["zooms"]))
            folds.append((case_id, fold))
    chosen = _choose(version, cases, "out-of-fold")
    choice, post = chosen["summary"], PostProcess.from_dict(chosen["postprocess"])
    features = {c: f for m in members for c, f in _out_of_fold_features(store, registry, m).items()}
    rows = []
    for (case_id, fold), (pred, truth, zooms) in zip(folds, cases):
        raw, final = evaluate_case(pred, truth, zooms), post.apply(pred, zooms)
        rows.append(
            {
                "case": case_id,
                "fold": fold,
                **_brief(evaluate_case(final, truth, zooms)),
                **{f"raw_{k}": v for k, v in _brief(raw).items() if k.startswith(("dice", "hd95"))},
                "truth_WT_ml": _ml(truth, (1, 2, 4), zooms),
                "truth_ET_ml": _ml(truth, (4,), zooms),
                "volumes_ml": volumes_ml(final, zooms),
                "features": features.get(case_id),
            }
        )
    calibration = _calibrate(rows, "out-of-fold")
    summary = summarize([{k: v for k, v in r.items() if k not in ("fold", "review")} for r in rows])
    per_fold = [
        {"fold": f, "cases": len(part), **{k: round(float(np.mean([r[k] for r in part])), 4) for k in _MEANS}}
        for f in range(len(members))
        if (part := [r for r in rows if r["fold"] == f])
    ]
    metrics = {k: round(summary[k]["mean"], 4) for k in _MEANS}
    metrics["dice_mean"] = round(float(np.mean([metrics[f"dice_{r}"] for r in REGIONS])), 4)
    cv = {"per_case": rows, "per_fold": per_fold, "summary": summary, "postprocess": choice}
    ensemble.record_postprocess(chosen["postprocess"], chosen["record"])
    ensemble.record_cv(metrics, cv)
    ensemble.record_quality(calibration)
    return {"metrics": metrics, "per_fold": per_fold, "per_case": rows, "postprocess": choice}


_MEANS = [f"{m}_{r}" for m in ("dice", "hd95") for r in REGIONS]


def _out_of_fold_features(store: SliceStore, registry: Registry, member: str) -> dict[str, dict]:
    """{case: quality features} of a fold version's out-of-fold cases, as ``predict_out_of_fold`` kept
    them; a version made before the quality estimate has them predicted now (and recorded)."""
    version = ModelVersion(registry, member)
    rows = version.info.out_of_fold
    if rows and all(r.get("features") for r in rows):
        return {r["case"]: r["features"] for r in rows}
    model, _ = load_model(registry, member)
    for row in rows:
        evidence = Evidence()
        predict_stored_case(store, row["case"], model, True, 16, evidence)
        row["features"] = evidence.features()
    version.record_out_of_fold(rows)
    return {r["case"]: r["features"] for r in rows}


def _ml(labels: np.ndarray, members: tuple, zooms) -> float:
    return round(float(np.isin(labels, members).sum()) * float(np.prod(zooms)) / 1000, 2)
