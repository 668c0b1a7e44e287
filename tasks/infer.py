"""Prefect task: one new scan -> ``<out>/<case>_seg.nii.gz`` + ``<out>/<case>.json``.

Read and validated like ingestion (``read_case``), preprocessed with the model's recorded profile,
predicted slice by slice (``unet.predict.predict_case``), written on the input's own grid with its
affine and header. Both files are written atomically, under an output-folder lock (two runs of one
case at once leave one segmentation and its own record), and the JSON comes last: it is the "done"
marker, so a killed run leaves nothing half-written at an output path, and a rerun skips a case
only when its JSON names the same model version, the same input sha256s and the same TTA setting.

Retried on transient I/O errors (``OSError``), never on invalid data (``InvalidCase``).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
from prefect import get_run_logger

from storage.cases import CaseFiles
from storage.nifti import atomic_write_bytes, digests, read_case, read_files, write_segmentation
from storage.outputs import failure_path, finished, made_with, note_failure, outputs, writing
from tasks.stage import run_logger, stage_task
from unet import quality
from unet.checkpoint import cached_model
from unet.postprocess import PostProcess
from unet.predict import Prediction, predict_case, volumes_ml
from unet.quality import Evidence


def scans_only(case: CaseFiles) -> CaseFiles:
    """Inference needs no segmentation; one lying beside the scans is neither read nor checked."""
    return replace(case, files={k: v for k, v in case.files.items() if k != "seg"})


def _earlier_record(case: CaseFiles, out: str, how: dict, sha256: dict[str, str]) -> dict | None:
    """The record of a finished earlier run made as ``how`` says on the same bytes (``sha256``: each
    input file's digest), else None."""
    done = finished(out, case.case_id, how)
    return done[0] if done is not None and done[0].get("sha256") == sha256 else None


@stage_task("infer-case", "infer-{case.case_id}")
def infer_case(
    case: CaseFiles, out: str, registry_url: str, version: str, prediction: Prediction, et_label: int | None = None
) -> dict:
    """``prediction``: TTA, post-processing (the model version's, or the network's raw output), the
    device (resolved: not "auto") and batch size. ``et_label``: the label written for enhancing
    tumour, 4 or 3; None: the input's own edition's."""
    start = time.perf_counter()
    case = scans_only(case)
    how = made_with(version, prediction.tta, et_label or case.et_label, prediction.postprocess)
    files = read_files(case)  # each file read once: hashed for the skip check, and decoded if not done
    done = _earlier_record(case, out, how, digests(files))
    if done is not None:
        return row(done, "skipped", time.perf_counter() - start)
    decoded = read_case(case, files)  # a storage.nifti.Case; InvalidCase: a one-line reason, no retry
    model, info = cached_model(registry_url, version, prediction.device)
    post = PostProcess.from_dict(info.postprocess) if prediction.postprocess else None
    evidence = Evidence()
    kw = dict(tta=prediction.tta, batch_size=prediction.batch_size, evidence=evidence)
    labels, attrs = predict_case(model, decoded, info.profile, post, **kw)
    volumes, features = volumes_ml(labels, decoded.zooms), evidence.features()
    estimated, reasons = quality.assess(features, volumes, info.quality)
    seg_path, record_path = outputs(out, case.case_id)
    et = how["et_label"]
    written = labels if et == 4 else np.where(labels == 4, np.uint8(et), labels)
    with writing(seg_path.parent):  # a second run of this case at once cannot interleave its pair with ours
        if (done := _earlier_record(case, out, how, decoded.sha256)) is not None:  # finished while we predicted
            return row(done, "skipped", time.perf_counter() - start)
        write_segmentation(written, decoded.reference, seg_path)  # the input's grid and header
        record = {
            "case": case.case_id,
            **how,
            "profile": info.profile,
            "postprocess": post and post.to_dict(),
            "segmentation": str(seg_path),
            "inputs": case.files,
            "sha256": decoded.sha256,
            "shape": attrs["shape"],
            "zooms": attrs["zooms"],
            "geometry": attrs["geometry"],
            "volumes_ml": volumes,
            "quality": estimated,  # estimated Dice per region (unet.quality), calibrated out of fold
            "review": bool(reasons),
            "review_reasons": reasons,
            "quality_features": features,
            "seconds": round(time.perf_counter() - start, 2),
        }
        atomic_write_bytes(record_path, json.dumps(record, indent=2).encode())  # last: the done marker
        failure_path(out, case.case_id).unlink(missing_ok=True)
    run_logger().info(
        "%s: %s by %s in %.1f s; WT %.1f ml, TC %.1f ml, ET %.1f ml; estimated Dice %s; %s",
        case.case_id,
        seg_path,
        version,
        record["seconds"],
        volumes["WT"],
        volumes["TC"],
        volumes["ET"],
        estimated,
        f"TO REVIEW: {'; '.join(reasons)}" if reasons else "no review needed",
    )
    return row(record, "written", record["seconds"])


def summarize(rows: list[dict], failures: list[str], out: str, model, prediction: Prediction) -> dict:
    """An inference run's outcome (``rows`` sorted by case here): written, skipped, failed, and the
    cases the quality estimate flags for review (logged as a warning)."""
    rows.sort(key=lambda r: r["case"])
    flagged = [r["case"] for r in rows if r["review"]]
    if flagged:
        get_run_logger().warning("%d of %d segmentation(s) to review: %s", len(flagged), len(rows), ", ".join(flagged))
    return {
        "out": out,
        "version": model.version,
        "profile": model.info.profile,
        "tta": prediction.tta,
        "postprocess": prediction.postprocess,
        "written": sum(r["status"] == "written" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "failed": len(failures),
        "review": len(flagged),  # the quality estimate's flag (unet.quality): look at these first
        "review_cases": flagged,
    }


def keep_failures(failed: list[tuple[CaseFiles, str]], out: str, version: str) -> None:
    """Note each failed case's one-line reason beside the outputs (``<case>.failed.json``: the inbox
    status shows it until the case is segmented)."""
    for case, reason in failed:
        note_failure(out, case.case_id, reason, version)


REVIEW_EVENT = "brats.segmentation.review"


def announce_reviews(rows: list[dict], out: str) -> list[str]:
    """Emit ``brats.segmentation.review`` for each segmentation written now and flagged for review (an
    automation may notify someone: deploy/prefect.yaml); returns their cases."""
    from prefect.events import emit_event

    flagged = [r for r in rows if r["review"] and r["status"] == "written"]
    for r in flagged:
        emit_event(
            REVIEW_EVENT,
            resource={"prefect.resource.id": f"brats.segmentation.{r['case']}", "prefect.resource.name": r["case"]},
            payload={
                "case": r["case"],
                "out": out,
                "segmentation": r["segmentation"],
                "model_version": r["model"],
                "quality": {k: r[f"est_{k}"] for k in ("WT", "TC", "ET")},
                "reasons": r["review_reasons"],
            },
        )
    return [r["case"] for r in flagged]


def row(record: dict, status: str, seconds: float) -> dict:
    """One line of the cases table."""
    v, q = record["volumes_ml"], record.get("quality") or {}
    return {
        "case": record["case"],
        "status": status,
        "review": record.get("review", False),
        "est_WT": q.get("WT"),
        "est_TC": q.get("TC"),
        "est_ET": q.get("ET"),
        "review_reasons": record.get("review_reasons", []),
        "WT_ml": v["WT"],
        "TC_ml": v["TC"],
        "ET_ml": v["ET"],
        "NCR_NET_ml": v["L1"],
        "ED_ml": v["L2"],
        "model": record["model_version"],
        "seconds": round(seconds, 2),
        "segmentation": record["segmentation"],
    }
