"""Flow ``evaluate``: a registered model against a split of the slice store, with BraTS metrics.

resolve the model (default: best) -> the split's cases (warn on overlap with its training cases)
-> evaluate_stored_case mapped over a thread pool (full 3D volumes on the original grid)
-> summary per region (mean, median, std) -> overlays of the best and worst case
-> saved with the model version (info.json "evaluation", evaluation.json, PNGs) -> artifacts
"""

from __future__ import annotations

import json
import time

import numpy as np
from prefect import flow, get_run_logger
from prefect.states import Failed
from prefect.utilities.annotations import unmapped

from flows.sections import documented, sections
from storage.registry import DEFAULT_ROOT
from storage.store import SliceStore
from storage.versions import ModelVersion
from tasks import report
from tasks.artifacts import RunProgress
from tasks.evaluate import NIFTI_TRUTH, evaluate_stored_case, overlay_case
from tasks.runners import case_threads, device_name, predict_runner
from tasks.stage import gather
from unet.metrics import REGIONS, summarize
from unet.predict import Prediction


def split_cases(store: SliceStore, split: str) -> list[str]:
    complete = store.case_ids()
    if split == "all":
        cases = complete
    elif split in store.split:
        cases = [c for c in store.split[split] if c in complete]
    else:
        raise ValueError(f"{store.url}: no split {split!r} (has {sorted(store.split)}; or use 'all')")
    if not cases:
        raise ValueError(f"{store.url}: split {split!r} holds no complete case")
    return cases


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
    version, info = model.version, model.info
    store = SliceStore(store_url)
    if info.profile != store.profile:
        raise ValueError(
            f"model {version} was trained on profile {info.profile!r}, {store_url} holds {store.profile!r}"
        )
    cases = split_cases(store, split)
    overlap = sorted(set(info.split.get("train", [])) & set(cases))
    if overlap:
        log.warning(
            "%d of %d evaluated cases were training cases of %s: metrics are optimistic (%s)",
            len(overlap),
            len(cases),
            version,
            ", ".join(overlap),
        )
    device = device_name(prediction.device)
    log.info("model %s on %s: %d %s case(s) of %s", version, device, len(cases), split, store_url)

    run = dict(store_url=store_url, registry_url=registry_url, version=version, device=device, tta=prediction.tta)
    post = info.postprocess if prediction.postprocess else None
    with case_threads(len(cases)), RunProgress(len(cases), "evaluate-progress", "evaluating cases") as progress:
        futures = evaluate_stored_case.map(cases, batch_size=prediction.batch_size, postprocess=unmapped(post), **run)
        rows, failed = gather(futures, cases, progress)
        rows.sort(key=lambda r: r["case"])
        figures = _overlays(rows, run)
    failures = [reason for _, reason in failed]

    summary = summarize(rows)
    record = {
        "split": split,
        "store": store_url,
        "fingerprint": store.fingerprint,
        "tta": prediction.tta,
        "postprocess": post,
        "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "train_overlap": overlap,
        "failed": failures,
        "summary": {k: v for k, v in summary.items() if k != "seconds"},
        "per_case": rows,
    }
    _save(model, record, figures)
    result = {
        "version": version,
        "split": split,
        "cases": len(rows),
        **{f"{m}_{r}": round(summary[f"{m}_{r}"]["mean"], 4) for m in ("dice", "hd95") for r in REGIONS if rows},
        "truth_from_store_label": sum(r["truth"] != NIFTI_TRUTH for r in rows),
        "train_overlap": len(overlap),
        "failed": len(failures),
    }
    report.evaluate(rows, summary, figures, record, result, shown)
    if failures:
        return Failed(message=f"{len(failures)} case(s) failed: " + "; ".join(failures), data=result)
    return result


def _save(model: ModelVersion, record: dict, figures: dict) -> None:
    """The evaluation, kept with the model version: its info's ``evaluation``, evaluation.json, PNGs."""
    registry, version = model.registry, model.version
    record["figures"] = {
        name: {"case": case, "file": registry.put(version, f"evaluation-{record['split']}-{name}.png", png)}
        for name, (case, png) in figures.items()
    }
    registry.put(version, "evaluation.json", json.dumps(record, indent=2).encode())
    model.record_evaluation(record)


def _overlays(rows: list[dict], run: dict) -> dict[str, tuple[str, bytes]]:
    """{"best"|"worst": (case, PNG)} by the mean Dice over WT, TC and ET; {"only": …} for one case."""
    if not rows:
        return {}
    ranked = sorted(rows, key=lambda r: np.mean([r[f"dice_{k}"] for k in REGIONS]))
    picks = {"best": ranked[-1]["case"], "worst": ranked[0]["case"]} if len(rows) > 1 else {"only": rows[0]["case"]}
    futures = {name: overlay_case.submit(case, title=f"{name} case", **run) for name, case in picks.items()}
    return {name: (picks[name], f.result()) for name, f in futures.items()}
