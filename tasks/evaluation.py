"""What an evaluation run does around its per-case task (``tasks.evaluate.evaluate_stored_case``):
which cases it scores and whether the model may be scored on them, the overlays of its best and worst
case, and its record, kept with the model version (its info's ``evaluation``, evaluation.json, PNGs).
"""

from __future__ import annotations

import json
import time

import numpy as np
from prefect import get_run_logger

from storage.store import SliceStore
from storage.versions import ModelVersion
from tasks.evaluate import NIFTI_TRUTH, overlay_case
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


def cases_to_evaluate(store_url: str, model: ModelVersion, split: str) -> tuple[list[str], list[str]]:
    """(the split's complete cases, those the model trained on); refuses a store of another profile
    and warns when the model trained on some of them."""
    info, store = model.info, SliceStore(store_url)
    if info.profile != store.profile:
        raise ValueError(
            f"model {model.version} was trained on profile {info.profile!r}, {store_url} holds {store.profile!r}"
        )
    cases = split_cases(store, split)
    overlap = sorted(set(info.split.get("train", [])) & set(cases))
    if overlap:
        get_run_logger().warning(
            "%d of %d evaluated cases were training cases of %s: metrics are optimistic (%s)",
            len(overlap),
            len(cases),
            model.version,
            ", ".join(overlap),
        )
    return cases, overlap


def overlays(rows: list[dict], run: dict) -> dict[str, tuple[str, bytes]]:
    """{"best"|"worst": (case, PNG)} by the mean Dice over WT, TC and ET; {"only": …} for one case."""
    if not rows:
        return {}
    ranked = sorted(rows, key=lambda r: np.mean([r[f"dice_{k}"] for k in REGIONS]))
    picks = {"best": ranked[-1]["case"], "worst": ranked[0]["case"]} if len(rows) > 1 else {"only": rows[0]["case"]}
    futures = {name: overlay_case.submit(case, title=f"{name} case", **run) for name, case in picks.items()}
    return {name: (picks[name], f.result()) for name, f in futures.items()}


def keep_evaluation(
    model: ModelVersion,
    store_url: str,
    split: str,
    prediction: Prediction,
    rows: list[dict],
    failures: list[str],
    overlap: list[str],
    figures: dict,
) -> tuple[dict, dict, dict]:
    """(record, result, summary) of an evaluation; the record and figures kept with the model version."""
    rows.sort(key=lambda r: r["case"])
    summary = summarize(rows)
    record = {
        "split": split,
        "store": store_url,
        "fingerprint": SliceStore(store_url).fingerprint,
        "tta": prediction.tta,
        "postprocess": model.info.postprocess if prediction.postprocess else None,
        "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "train_overlap": overlap,
        "failed": failures,
        "summary": {k: v for k, v in summary.items() if k != "seconds"},
        "per_case": rows,
    }
    registry, version = model.registry, model.version
    record["figures"] = {
        name: {"case": case, "file": registry.put(version, f"evaluation-{split}-{name}.png", png)}
        for name, (case, png) in figures.items()
    }
    registry.put(version, "evaluation.json", json.dumps(record, indent=2).encode())
    model.record_evaluation(record)
    result = {
        "version": version,
        "split": split,
        "cases": len(rows),
        **{f"{m}_{r}": round(summary[f"{m}_{r}"]["mean"], 4) for m in ("dice", "hd95") for r in REGIONS if rows},
        "truth_from_store_label": sum(r["truth"] != NIFTI_TRUTH for r in rows),
        "train_overlap": len(overlap),
        "failed": len(failures),
    }
    return record, result, summary
