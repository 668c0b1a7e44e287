"""Flow ``infer``: new BraTS scans -> segmentations on their own grid, with tumour volumes.

    resolve the model (default: best) -> discover cases (roots or single case folders) ->
    infer_case mapped over a thread pool (skip done, one-line error for a bad scan) ->
    artifacts (cases with volumes, summary); Failed, naming every bad scan, if any failed
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.states import Failed
from pydantic import BaseModel, Field

from flows.report import report
from storage.nifti import NAMINGS, Naming, discover
from storage.registry import DEFAULT_ROOT, Registry
from tasks.artifacts import RunProgress, markdown, table
from tasks.infer import case_threads, device_name, infer_case, predict_runner


class PredictOptions(BaseModel):
    """How scans are segmented: which model, on what, how (shared by infer and the inbox sweep)."""

    out: str = Field(description="Output folder: <case>_seg.nii.gz and <case>.json per case")
    model: str | None = Field(None, description="Model version, 'latest', or empty for the best")
    models: str = Field(DEFAULT_ROOT, description="Model registry: a local path or an fsspec URL")
    naming: Naming = Field("auto", description="file names: auto (per case), brats2019 (flair/t1/t1ce/t2) or brats2023 (t2f/t1n/t1c/t2w)")
    tta: bool = Field(False, description="Mirror test-time augmentation (2x the compute)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, …")
    batch_size: int = Field(16, ge=1, description="Slices per forward pass")
    et_label: Literal[3, 4] | None = Field(None, description="Label written for enhancing tumour: 4 (BraTS up to 2021) or 3 (2023+); empty: the input's own edition")


class InferParams(PredictOptions):
    """Parameters of an inference run (rendered as a form in the Prefect UI)."""

    inputs: list[str] = Field(description="Scans in the BraTS layout: roots ({HGG,LGG}/<case>/ or <case>/) or case folders", min_length=1)


@flow(name="infer", task_runner=predict_runner(), log_prints=True)
def infer(params: InferParams) -> dict:
    log = get_run_logger()
    registry = Registry(params.models)
    version = registry.resolve(params.model)
    profile = registry.info(version)["profile"]
    found = discover(*params.inputs, naming=params.naming)
    device = device_name(params.device)
    log.info("model %s (profile %s) on %s: %d case(s) -> %s", version, profile, device, len(found.cases), params.out)

    rows, failures = [], [str(p) for p in found.problems]
    with case_threads(len(found.cases)), RunProgress(len(found.cases), "infer-progress", "segmenting scans") as progress:
        futures = infer_case.map(
            found.cases, out=params.out, models=params.models, version=version,
            device=device, tta=params.tta, batch_size=params.batch_size, et_label=params.et_label,
        )
        for future in as_completed(futures):
            future.wait()
            state = future.state
            if state.is_completed():
                rows.append(future.result())
            else:
                failures.append(str(state.result(raise_on_failure=False)))
                log.error("%s", failures[-1])
            progress.advance()

    rows.sort(key=lambda r: r["case"])
    summary = {
        "out": params.out,
        "model": version,
        "profile": profile,
        "tta": params.tta,
        "written": sum(r["status"] == "written" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "failed": len(failures),
    }
    _artifacts(rows, failures, summary)
    if failures:
        return Failed(message=f"{len(failures)} scan(s) failed: " + "; ".join(failures), data=summary)
    return summary


def _artifacts(rows: list[dict], failures: list[str], summary: dict) -> None:
    table(rows or [{"case": "", "status": "no cases"}], "infer-cases", "Segmented scans with tumour volumes (ml)")
    lines = [f"# Inference → `{summary['out']}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items() if k != "out"]
    if rows:
        lines += ["", "| case | WT ml | TC ml | ET ml | status |", "|---|---:|---:|---:|---|"]
        lines += [f"| {r['case']} | {r['WT_ml']:.1f} | {r['TC_ml']:.1f} | {r['ET_ml']:.1f} | {r['status']} |" for r in rows]
    if failures:
        lines += ["", "## Failed", ""] + [f"- {f}" for f in failures]
    markdown("\n".join(lines), "infer-summary", "Inference summary")


def add_command(sub) -> None:
    p = sub.add_parser("infer", help="segment new scans: <out>/<case>_seg.nii.gz on the input grid + <case>.json")
    p.add_argument("inputs", nargs="+", metavar="PATH", help="BraTS root(s) or case folder(s); no seg needed")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=None, help="model version or 'latest' (default: the best)")
    p.add_argument("--models", default=DEFAULT_ROOT, help=f"model registry (default: {DEFAULT_ROOT}, or $BRATS_MODELS)")
    p.add_argument("--naming", choices=NAMINGS, default="auto")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation (2x the compute)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, … (default: auto)")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    p.add_argument("--et-label", type=int, choices=[3, 4], default=None, help="label written for enhancing tumour (default: the input's edition: 4 up to 2021, 3 for 2023+)")
    p.set_defaults(run=run_cli)


def run_cli(args) -> int:
    params = InferParams(
        inputs=args.inputs, out=args.out, model=args.model, models=args.models, naming=args.naming,
        tta=args.tta, device=args.device, batch_size=args.batch_size, et_label=args.et_label,
    )
    return report(infer(params, return_state=True))
