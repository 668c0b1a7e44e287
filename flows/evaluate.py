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
from prefect.futures import as_completed
from prefect.utilities.annotations import unmapped
from prefect.states import Failed
from pydantic import BaseModel, Field

from flows.report import report
from storage.registry import DEFAULT_ROOT, Registry
from storage.store import SliceStore
from tasks.artifacts import RunProgress, markdown, png_markdown, table
from tasks.evaluate import NIFTI_TRUTH, evaluate_stored_case, overlay_case
from tasks.infer import case_threads, device_name, predict_runner
from unet.metrics import REGIONS, summarize

METRICS = {"dice": "Dice", "hd95": "HD95 (mm)", "sens": "Sensitivity", "spec": "Specificity"}


class EvaluateParams(BaseModel):
    """Parameters of an evaluation run (rendered as a form in the Prefect UI)."""

    store: str = Field(description="Slice store: a local path or an fsspec URL")
    model: str | None = Field(None, description="Model version, 'latest', or empty for the best")
    split: str = Field("test", description="train, val, test or all")
    models: str = Field(DEFAULT_ROOT, description="Model registry: a local path or an fsspec URL")
    tta: bool = Field(False, description="Mirror test-time augmentation (2x the compute)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, …")
    batch_size: int = Field(16, ge=1, description="Slices per forward pass")
    postprocess: bool = Field(True, description="Apply the model's post-processing (chosen on its validation cases); off: the network's raw output")


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
def evaluate(params: EvaluateParams) -> dict:
    log = get_run_logger()
    registry = Registry(params.models)
    version = registry.resolve(params.model)
    info = registry.info(version)
    store = SliceStore(params.store)
    if info["profile"] != store.profile:
        raise ValueError(f"model {version} was trained on profile {info['profile']!r}, {params.store} holds {store.profile!r}")
    cases = split_cases(store, params.split)
    overlap = sorted(set(info.get("split", {}).get("train", [])) & set(cases))
    if overlap:
        log.warning("%d of %d evaluated cases were training cases of %s: metrics are optimistic (%s)", len(overlap), len(cases), version, ", ".join(overlap))
    device = device_name(params.device)
    log.info("model %s on %s: %d %s case(s) of %s", version, device, len(cases), params.split, params.store)

    run = dict(store_url=params.store, models=params.models, version=version, device=device, tta=params.tta)
    post = info.get("postprocess") if params.postprocess else None
    rows, failures = [], []
    with case_threads(len(cases)), RunProgress(len(cases), "evaluate-progress", "evaluating cases") as progress:
        for future in as_completed(evaluate_stored_case.map(cases, batch_size=params.batch_size, postprocess=unmapped(post), **run)):
            future.wait()
            if future.state.is_completed():
                rows.append(future.result())
            else:
                failures.append(str(future.state.result(raise_on_failure=False)))
                log.error("%s", failures[-1])
            progress.advance()
        rows.sort(key=lambda r: r["case"])
        figures = _overlays(rows, run)

    summary = summarize(rows)
    record = _save(registry, version, params, store.fingerprint, rows, summary, figures, overlap, failures, post)
    result = {
        "model": version,
        "split": params.split,
        "cases": len(rows),
        **{f"{m}_{r}": round(summary[f"{m}_{r}"]["mean"], 4) for m in ("dice", "hd95") for r in REGIONS if rows},
        "truth_from_store_label": sum(r["truth"] != NIFTI_TRUTH for r in rows),
        "train_overlap": len(overlap),
        "failed": len(failures),
    }
    _artifacts(rows, summary, figures, record, result)
    if failures:
        return Failed(message=f"{len(failures)} case(s) failed: " + "; ".join(failures), data=result)
    return result


def _save(registry: Registry, version: str, params: EvaluateParams, fingerprint, rows, summary, figures, overlap, failures, post) -> dict:
    """The evaluation, kept with the model version: info.json "evaluation", evaluation.json, PNGs."""
    files = {
        name: {"case": case, "file": registry.put(version, f"evaluation-{params.split}-{name}.png", png)}
        for name, (case, png) in figures.items()
    }
    record = {
        "split": params.split,
        "store": params.store,
        "fingerprint": fingerprint,
        "tta": params.tta,
        "postprocess": post,
        "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "train_overlap": overlap,
        "failed": failures,
        "summary": {k: v for k, v in summary.items() if k != "seconds"},
        "per_case": rows,
        "figures": files,
    }
    registry.put(version, "evaluation.json", json.dumps(record, indent=2).encode())
    registry.update_info(version, evaluation=record)
    return record


def _overlays(rows: list[dict], run: dict) -> dict[str, tuple[str, bytes]]:
    """{"best"|"worst": (case, PNG)} by the mean Dice over WT, TC and ET."""
    if not rows:
        return {}
    ranked = sorted(rows, key=lambda r: np.mean([r[f"dice_{k}"] for k in REGIONS]))
    picks = {"best": ranked[-1]["case"], "worst": ranked[0]["case"]}
    futures = {name: overlay_case.submit(case, title=f"{name} case", **run) for name, case in picks.items()}
    return {name: (picks[name], f.result()) for name, f in futures.items()}


def _artifacts(rows: list[dict], summary: dict, figures: dict, record: dict, result: dict) -> None:
    columns = ["case", "grade", *(f"{m}_{r}" for m in METRICS for r in REGIONS), "truth", "seconds"]
    table([{c: r[c] for c in columns} for r in rows] or [{"case": "", "truth": "no case evaluated"}], "evaluate-cases", "BraTS metrics per case (3D, original grid)")
    lines = [f"# Evaluation of `{result['model']}` on the {result['split']} split", "", f"{len(rows)} case(s) of `{record['store']}`, TTA {'on' if record['tta'] else 'off'}, post-processing {record['postprocess'] or 'off'}.", ""]
    if record["train_overlap"]:
        lines += [f"**Warning:** {len(record['train_overlap'])} evaluated case(s) were training cases of this model: {', '.join(record['train_overlap'])}.", ""]
    if result["truth_from_store_label"]:
        lines += [f"**Note:** {result['truth_from_store_label']} case(s) scored against the store label restored to the grid (original seg unavailable).", ""]
    if rows:
        lines += ["| metric | | " + " | ".join(REGIONS) + " |", "|---|---|" + "---:|" * len(REGIONS)]
        for m, name in METRICS.items():
            for stat in ("mean", "median", "std"):
                lines.append(f"| {name} | {stat} | " + " | ".join(f"{summary[f'{m}_{r}'][stat]:.3f}" for r in REGIONS) + " |")
    for name, (case, png) in figures.items():
        lines += ["", f"## {name.capitalize()} case: {case}", "", png_markdown(png, f"{name} case {case}")]
    if record["failed"]:
        lines += ["", "## Failed", ""] + [f"- {f}" for f in record["failed"]]
    markdown("\n".join(lines), "evaluate-summary", "BraTS metrics summary with best and worst case")


def add_command(sub) -> None:
    p = sub.add_parser("evaluate", help="BraTS metrics (Dice, HD95, sens/spec) of a model on a split of the store")
    p.add_argument("--store", required=True, help="slice store path or fsspec URL")
    p.add_argument("--model", default=None, help="model version or 'latest' (default: the best)")
    p.add_argument("--split", default="test", help="train, val, test or all (default: test)")
    p.add_argument("--models", default=DEFAULT_ROOT, help=f"model registry (default: {DEFAULT_ROOT}, or $BRATS_MODELS)")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation (2x the compute)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, … (default: auto)")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false", help="score the network's raw output")
    p.set_defaults(run=run_cli)


def run_cli(args) -> int:
    params = EvaluateParams(
        store=args.store, model=args.model, split=args.split, models=args.models,
        tta=args.tta, device=args.device, batch_size=args.batch_size, postprocess=args.postprocess,
    )
    return report(evaluate(params, return_state=True))
