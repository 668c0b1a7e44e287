"""What a person reads of each run: one function per stage, called by its flow in one line.

Each writes the run's table(s) and a markdown summary artifact (figures inline as PNG data URIs,
which the Prefect UI renders). Every summary opens with the sections the run actually used (after a
recipe's and the deployment's values were merged), since a run's Parameters tab shows only what the
run itself set. Files are named by their registry path or URL, as text: a browser cannot open a
server's local ``file://`` path, and an ``s3://`` one needs credentials.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
from prefect import get_run_logger
from pydantic import BaseModel

from storage.outputs import outputs
from storage.versions import ModelVersion
from tasks.artifacts import key, markdown, png_markdown, table
from unet.metrics import REGIONS

METRICS = {"dice": "Dice", "hd95": "HD95 (mm)"}  # the per-case table; sensitivity and specificity stay in the record


def used(**sections: BaseModel) -> list[str]:
    """Log the sections a run uses, and return them as markdown lines for its summary."""
    get_run_logger().info("sections used: %s", {name: s.model_dump() for name, s in sections.items()})
    lines = ["## Sections used", ""]
    for name, section in sections.items():
        lines.append(f"**{name}**: " + ", ".join(f"{k} `{v}`" for k, v in section.model_dump().items()))
        lines.append("")
    return lines


def _facts(summary: dict) -> list[str]:
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in summary.items()]]


def _failed(title: str, failures: list[str]) -> list[str]:
    return ["", f"## {title}", "", *[f"- {f}" for f in failures]] if failures else []


def ingest(store_url: str, summary: dict, rows: list[dict], quarantine: list[dict], sections: list[str]) -> None:
    table(sorted(rows, key=lambda r: r["case"]), "ingest-cases", "Cases this run ingested or skipped (unchanged)")
    if quarantine:
        table(quarantine, "ingest-quarantine", "Cases refused, with the reason")
    lines = [f"# Ingest → `{store_url}`", "", *_facts(summary), "", *sections]
    markdown("\n".join(lines + _failed("Quarantined", [q["reason"] for q in quarantine])), "ingest-summary", "Ingest")


def train(registry_url: str, version: str, summary: dict, sections: list[str]) -> None:
    """The training's epoch table and summary: validation Dice, post-processing, curves, validation slices."""
    model = ModelVersion(registry_url, version)
    registry, info = model.registry, model.info
    rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in info.history]
    table(rows, "train-epochs", f"Loss and validation Dice per epoch of {version}")
    m, files, post = summary["metrics"], summary["files"], info.postprocess_choice
    fold = info.fold
    resumed = summary["resumed_from"]
    lines = [
        f"# Training → `{version}`" + (f" (fold {fold} of a cross-validation)" if fold is not None else ""),
        "",
        f"Kept epoch **{m['best_epoch']}** of {summary['epochs']}: validation Dice WT **{m['dice_WT']:.3f}**, "
        f"TC **{m['dice_TC']:.3f}**, ET **{m['dice_ET']:.3f}** (mean {m['dice_mean']:.3f}, store grid); "
        f"{summary['steps']} steps on `{summary['device']}` in {summary['seconds']} s"
        + (f", resumed at epoch {resumed['epoch']} step {resumed['step']}" if resumed else "")
        + ".",
        "",
    ]
    if post:
        lines += [_choice_line(info.postprocess, post), ""]
    lines += [
        *sections,
        f"## Files in `{registry.root}/{version}/`",
        "",
        *[f"- `{name}`" for name in (registry.INFO, "weights.pt", "checkpoint.pt", *files)],
        "",
        "## Curves",
        "",
        png_markdown(registry.get(version, "curves.png"), "loss and Dice per epoch"),
        "",
        "## Validation slices: truth | what inference writes there (brain only, TTA)",
        "",
        *[png_markdown(registry.get(version, name), name) for name in files if name.startswith("overlay-")],
    ]
    markdown("\n".join(lines), key("train-summary"), f"Training summary of {version}")


def _choice_line(post: dict, choice: dict) -> str:
    return (
        f"Post-processing chosen on {choice['cases']} {choice.get('on', 'validation')} case(s): `{post}` "
        f"(mean Dice {choice['mean_dice_before']:.4f} → {choice['mean_dice_after']:.4f}, "
        f"HD95 {choice['mean_hd95_before']:.1f} → {choice['mean_hd95_after']:.1f} mm, original grids)."
    )


def cross_validation(version: str, cv: dict, folds: int, sections: list[str]) -> None:
    """The per-case table (worst first) and the summary: pooled and per-fold scores, the worst cases by
    name, the post-processing chosen on the out-of-fold segmentations."""
    rows = sorted(cv["per_case"], key=lambda r: min(r[f"dice_{k}"] for k in REGIONS))
    table(rows, "cv-cases", f"Out-of-fold scores per case of {version}, worst first")
    cols = [f"{m}_{r}" for m in METRICS for r in REGIONS]
    worst = [min if c.startswith("dice") else max for c in cols]
    cell = lambda c, v: f"{v:.3f}" if c.startswith("dice") else f"{v:.1f}"  # noqa: E731
    post = cv["postprocess"]
    lines = [
        f"# Cross-validation → `{version}`",
        "",
        f"{folds}-fold cross-validation over {len(rows)} cases by patient; `{version}` is the ensemble of the "
        f"{folds} fold models. Every case is scored by the fold model that never saw it, on its original grid.",
        "",
        _choice_line(post["postprocess"], {**post, "cases": len(rows), "on": "out-of-fold"}),
        "",
        "| | " + " | ".join(f"{METRICS[c.split('_')[0]]} {c.split('_')[1]}" for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
        *[
            f"| {name} | " + " | ".join(cell(c, fn([r[c] for r in rows])) for c, fn in zip(cols, fns)) + " |"
            for name, fns in (("mean", [np.mean] * 6), ("median", [np.median] * 6), ("worst", worst))
        ],
        "",
        "| fold | cases | " + " | ".join(f"Dice {r}" for r in REGIONS) + " |",
        "|---|---:|" + "---:|" * 3,
        *[
            f"| {f['fold']} | {f['cases']} | " + " | ".join(f"{f[f'dice_{r}']:.3f}" for r in REGIONS) + " |"
            for f in cv["per_fold"]
        ],
        "",
        "Worst cases: "
        + "; ".join(
            f"`{r['case']}` (WT {r['dice_WT']:.2f}, TC {r['dice_TC']:.2f}, ET {r['dice_ET']:.2f}; "
            f"truth WT {r['truth_WT_ml']} ml, ET {r['truth_ET_ml']} ml)"
            for r in rows[:3]
        )
        + ".",
        "",
        *sections,
    ]
    markdown("\n".join(lines), key("cv-summary"), f"Cross-validation summary of {version}")


def evaluate(rows: list[dict], summary: dict, figures: dict, record: dict, result: dict, sections: list[str]) -> None:
    """The per-case table (Dice and HD95 per region) and the summary: mean, and with several cases
    median and spread, the best and the worst case's slice (one figure for one case)."""
    if rows:
        columns = ["case", *(f"{m}_{r}" for m in METRICS for r in REGIONS), "truth"]
        table(
            [{c: r[c] for c in columns} for r in rows], "evaluate-cases", "BraTS metrics per case (3D, original grid)"
        )
    lines = [
        f"# Evaluation of `{result['version']}` on the {result['split']} split",
        "",
        f"{len(rows)} case(s) of `{record['store']}`, TTA {'on' if record['tta'] else 'off'}, "
        f"post-processing {record['postprocess'] or 'off'}.",
        "",
    ]
    if record["train_overlap"]:
        lines += [
            f"**Warning:** {len(record['train_overlap'])} evaluated case(s) were training cases of this model: "
            f"{', '.join(record['train_overlap'])}.",
            "",
        ]
    if result["truth_from_store_label"]:
        lines += [
            f"**Note:** {result['truth_from_store_label']} case(s) scored against the store label restored to the grid "
            "(original seg unavailable).",
            "",
        ]
    if rows:
        stats = ("mean", "median", "std", "min") if len(rows) > 1 else ("mean",)
        lines += ["| metric | | " + " | ".join(REGIONS) + " |", "|---|---|" + "---:|" * len(REGIONS)]
        for m, name in {**METRICS, "sens": "Sensitivity", "spec": "Specificity"}.items():
            for stat in stats:
                values = " | ".join(f"{summary[f'{m}_{r}'][stat]:.3f}" for r in REGIONS)
                lines.append(f"| {name} | {stat if len(rows) > 1 else 'the case'} | {values} |")
    for name, (case, png) in figures.items():
        lines += ["", f"## {name.capitalize()} case: {case}", "", png_markdown(png, f"{name} case {case}")]
    lines += ["", *sections] + _failed("Failed", record["failed"])
    markdown("\n".join(lines), "evaluate-summary", "BraTS metrics summary with best and worst case")


def infer(out: str, summary: dict, rows: list[dict], failures: list[str], sections: list[str]) -> None:
    """The cases to review first (the quality estimate's flag), then the rest; each with its estimated
    Dice and volumes, and as many pictures as ``PICTURES`` (flagged first) of the segmentation over
    its FLAIR and T1ce slice with the most tumour."""
    rows = sorted(rows, key=lambda r: (not r["review"], r["est_WT"] if r["est_WT"] is not None else 1, r["case"]))
    if rows:
        table(rows, "infer-cases", "Segmented scans, the ones to review first: estimated Dice, volumes (ml)")
    lines = [f"# Inference → `{out}`", "", *_facts(summary), ""]
    flagged = [r for r in rows if r["review"]]
    if rows:
        lines += [f"## To review: {len(flagged)} of {len(rows)}", ""]
        lines += [f"- **{r['case']}**: {'; '.join(r['review_reasons'])}" for r in flagged] or ["none"]
        lines += ["", "## Cases", "", "| case | review | est. Dice WT / TC / ET | WT ml | TC ml | ET ml | status |"]
        lines += ["|---|---|---|---:|---:|---:|---|"]
        for r in rows:
            est = " / ".join(f"{r[f'est_{k}']:.2f}" if r[f"est_{k}"] is not None else "–" for k in ("WT", "TC", "ET"))
            flag, ml = "**yes**" if r["review"] else "", " | ".join(f"{r[f'{k}_ml']:.1f}" for k in ("WT", "TC", "ET"))
            lines.append(f"| {r['case']} | {flag} | {est} | {ml} | {r['status']} |")
        lines += ["", "## Pictures (flagged first): the slice with the most tumour", ""]
        lines += [png_markdown(segmentation_picture(out, r), r["case"]) for r in rows[:PICTURES]]
        lines.append("")
    markdown("\n".join(lines + sections + _failed("Failed", failures)), "infer-summary", "Inference summary")


PICTURES = 8  # pictures in an inference summary: a markdown artifact holds them inline


def segmentation_picture(out: str, row: dict) -> bytes:
    """The written segmentation of a case over its FLAIR and T1ce, at the axial slice with the most tumour."""
    from tasks.figures import scan_png  # here: matplotlib is imported once the segmentations are written

    record = json.loads(outputs(out, row["case"])[1].read_text())
    seg = np.asanyarray(nib.load(record["segmentation"]).dataobj)
    z = int(np.argmax((seg > 0).sum((0, 1))))
    classes = np.select([seg == 1, seg == 2, np.isin(seg, (3, 4))], [1, 2, 3], 0)[:, :, z]
    flair, t1ce = (np.asanyarray(nib.load(record["inputs"][m]).dataobj[:, :, z]) for m in ("flair", "t1ce"))
    flag = "REVIEW: " if row["review"] else ""
    est = ", ".join(f"{k} {row[f'est_{k}']:.2f}" for k in ("WT", "TC", "ET") if row[f"est_{k}"] is not None)
    title = f"{flag}{row['case']}, slice {z}, estimated Dice {est}"
    return scan_png(np.rot90(flair), np.rot90(t1ce), np.rot90(classes), title)


SWEEP_COLUMNS = ("case", "status", "sweep", "version", "best", "review", "why", "path")


def sweep(out: str, summary: dict, rows: list[dict], sections: list[str]) -> None:
    """``rows``: ``storage.inbox.after_sweep``'s: where each scan stands now, and what the sweep did."""
    if rows:
        shown = [{c: "" if r.get(c) is None else r[c] for c in SWEEP_COLUMNS} for r in rows]
        table(shown, "sweep-cases", "Where each scan of the inbox stands, and what the sweep did with it")
    lines = [f"# Inbox sweep → `{out}`", "", *_facts(summary), "", *sections]
    markdown("\n".join(lines), "sweep-summary", "Inbox sweep summary")


STAGE_SUMMARY = {"ingest": "ingest-summary", "train": "train-summary", "evaluate": "evaluate-summary"}


def pipeline(runs: dict, outcomes: dict[str, str]) -> None:
    """The pipeline run's own summary: each stage's state and outcome, with links to its run and to its
    summary artifact's own page (a cross-validation's summary is ``cv-summary``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_UI_URL

    ui = (PREFECT_UI_URL.value() or "").rstrip("/")
    lines = ["# Pipeline", "", "| stage | run | summary | state | outcome |", "|---|---|---|---|---|"]
    with get_client(sync_client=True) as client:
        for stage, state in runs.items():
            run_id = state.state_details.flow_run_id
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )
            wanted = ("cv-summary", STAGE_SUMMARY[stage])
            page = next((a for k in wanted for a in found if a.key == k), None)
            link = f"[{page.key}]({ui}/artifacts/artifact/{page.id})" if page else "—"
            row = (
                f"| {stage} | [{stage} run]({ui}/runs/flow-run/{run_id}) | {link} | {state.name} | {outcomes[stage]} |"
            )
            lines.append(row)
    markdown("\n".join(lines), "pipeline-summary", "The pipeline's stages, with links to their runs and summaries")
