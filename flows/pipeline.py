"""Flow ``pipeline``: ingest -> train -> evaluate as subflows, and ``brats demo``, the whole story.

``brats demo`` synthesizes a small BraTS-like dataset, runs the pipeline on the embedded
defaults (ephemeral Prefect API, Dask LocalCluster, local store), segments a few fresh synthetic
"new" scans with the model it just trained, and prints where everything is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.states import Failed
from pydantic import BaseModel, Field

from flows.evaluate import EvaluateParams, evaluate
from flows.infer import InferParams, infer
from flows.ingest import IngestParams, ingest
from flows.report import report
from flows.train import TrainParams, train
from storage.registry import DEFAULT_ROOT
from storage.store import SliceStore
from storage.synth import write_dataset


class PipelineParams(BaseModel):
    """A scheduled data-to-model run (rendered as a form in the Prefect UI)."""

    raw: list[str] = Field(description="Raw roots in the BraTS layout", min_length=1)
    store: str = Field(description="Slice store: a local path or an fsspec URL")
    models: str = Field(DEFAULT_ROOT, description="Model registry root")
    profile: Literal["full", "tp"] = Field("tp", description="full: 240×240 slices; tp: crop 192, downsample → 96×96")
    train: dict[str, Any] = Field(default_factory=dict, description="Training options (see the train flow), e.g. {\"epochs\": 10}")
    evaluate_split: str = Field("test", description="Split to evaluate on: train, val, test or all")
    allow_quarantine: bool = Field(True, description="Go on training when some cases were quarantined")


@flow(name="pipeline", log_prints=True)
def pipeline(params: PipelineParams) -> dict:
    log = get_run_logger()
    train_params = TrainParams(**{**params.train, "store": params.store, "models": params.models})  # fail fast on bad options

    ingested = ingest(IngestParams(raw=params.raw, store=params.store, profile=params.profile), return_state=True)
    summary = ingested.result(raise_on_failure=False)
    if not isinstance(summary, dict) or (ingested.is_failed() and not params.allow_quarantine):
        return Failed(message=f"ingest: {ingested.message}")
    if not SliceStore(params.store).split.get("train"):
        return Failed(message=f"ingest left no training cases in {params.store}")
    if ingested.is_failed():
        log.warning("going on without the quarantined cases: %s", ingested.message)

    trained = train(train_params)
    evaluated = evaluate(EvaluateParams(store=params.store, models=params.models, model=trained["version"], split=params.evaluate_split))
    return {"ingest": summary, "train": {k: trained[k] for k in ("version", "metrics", "best") if k in trained}, "evaluate": evaluated}


# ------------------------------------------------------------------ brats demo


def add_command(sub) -> None:
    p = sub.add_parser("demo", help="synthetic data -> ingest -> train -> evaluate -> infer, all on this machine")
    p.add_argument("--workdir", default="runs/demo", help="where data, store, models and outputs go")
    p.add_argument("--cases", type=int, default=16, help="synthetic training cases")
    p.add_argument("--new-scans", type=int, default=2, help="fresh synthetic scans to segment at the end")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_cli)

    p = sub.add_parser("pipeline", help="ingest -> train -> evaluate on existing raw data")
    p.add_argument("raw", nargs="+")
    p.add_argument("--store", required=True)
    p.add_argument("--models", default=DEFAULT_ROOT)
    p.add_argument("--profile", choices=["full", "tp"], default="tp")
    p.add_argument("--train", default="{}", help='training options as JSON, e.g. \'{"epochs": 10}\'')
    p.set_defaults(run=run_pipeline_cli)


def run_pipeline_cli(args) -> int:
    params = PipelineParams(raw=args.raw, store=args.store, models=args.models, profile=args.profile, train=json.loads(args.train))
    return report(pipeline(params, return_state=True))


def demo_params(work: Path, epochs: int, base_channels: int, seed: int) -> PipelineParams:
    """The demo's settings: small enough for a 2-core laptop, big enough to learn (see README)."""
    return PipelineParams(
        raw=[str(work / "raw")],
        store=str(work / "slices.zarr"),
        models=str(work / "models"),
        profile="tp",
        train={
            "epochs": epochs, "base_channels": base_channels, "depth": 4, "padding": "same", "norm": "batch",
            "batch_size": 8, "lr": 3e-3, "max_steps_per_epoch": 40,
            "oversample_tumour": 3.0, "class_weight_power": 0.5, "seed": seed, "workers": 1, "fresh": True,
        },
    )


def run_cli(args) -> int:
    work = Path(args.workdir)
    start = time.perf_counter()
    if not (work / "raw").exists():
        write_dataset(work / "raw.part", args.cases, seed=args.seed)
        (work / "raw.part").rename(work / "raw")
    if not (work / "inbox").exists():
        write_dataset(work / "inbox.part", args.new_scans, seed=args.seed + 1000, with_seg=False, prefix="BraTS19_NEW")
        (work / "inbox.part").rename(work / "inbox")
    print(f"synthetic data ready in {work} ({time.perf_counter() - start:.0f} s)")

    params = demo_params(work, args.epochs, args.base_channels, args.seed)
    state = pipeline(params, return_state=True)
    result = state.result(raise_on_failure=False)
    if not state.is_completed() or not isinstance(result, dict):
        return report(state)
    version = result["train"]["version"]
    inferred = infer(InferParams(inputs=[str(work / "inbox")], out=str(work / "segmentations"), models=params.models, model=version), return_state=True)
    if not inferred.is_completed():
        return report(inferred)

    ev = result["evaluate"]
    print(f"\nBraTS demo finished in {time.perf_counter() - start:.0f} s")
    print(f"  model {version} ({params.models}), evaluated on {ev['cases']} held-out case(s):")
    for region in ("WT", "TC", "ET"):
        print(f"    {region}: Dice {ev[f'dice_{region}']:.3f}   HD95 {ev[f'hd95_{region}']:.1f} mm")
    print(f"  slice store      {params.store}")
    print(f"  segmentations    {work / 'segmentations'}  (<case>_seg.nii.gz + <case>.json volumes)")
    print("  runs, artifacts  in the Prefect UI: `prefect server start`, then rerun with PREFECT_API_URL set (README)")
    return 0
