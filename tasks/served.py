"""Prefect task: one submitted scan -> its segmentation, by the warm model of a ``brats serve`` process.

``brats submit --served`` / ``brats watch --served`` send ``segment_scan.delay(path, case)``; the
``brats serve`` process (a Prefect task worker, ``flows/cli/served.py``) runs it with the settings it
was started with (``SETTINGS``: output folder, registry, model, prediction) and the model it keeps
loaded. The work is the infer flow's own task body (``tasks.infer.infer_case``: same outputs, same
record, same skip rule); the model version is resolved for each scan, so a new best model is used
from the next scan on.

Importing this module is light (no torch): ``brats submit`` imports it to send the task.
"""

from __future__ import annotations

from tasks.stage import stage_task

SETTINGS: dict = {}  # set by flows.cli.served.serve in the serving process; the submitter never reads it


@stage_task("segment-scan", "segment-{case}", tags=["served"])
def segment_scan(path: str, case: str, naming: str = "auto") -> dict:
    """Segment the case folder ``path`` (case id ``case``) with this process's warm model."""
    from prefect import get_run_logger

    from storage.cases import InvalidCase, discover
    from storage.registry import Registry
    from tasks.artifacts import table
    from tasks.infer import announce_reviews, infer_case

    if not SETTINGS:
        raise RuntimeError("segment-scan runs in a `brats serve` process (it holds the settings and the model)")
    found = discover(path, naming=naming)
    cases = [c for c in found.cases if c.case_id == case]
    if not cases:
        raise found.problems[0] if found.problems else InvalidCase(path, f"no complete case {case} here")
    s = SETTINGS
    version = Registry(s["registry_url"]).resolve(s["version"])
    get_run_logger().info("%s: segmenting %s with the served model %s", case, path, version)
    row = infer_case.fn(cases[0], s["out"], s["registry_url"], version, s["prediction"], s["et_label"])
    flag = f"TO REVIEW ({'; '.join(row['review_reasons'])})" if row["review"] else "no review needed"
    table([row], "served-scan", f"Scan {case} segmented by the served model {version}: {flag}")
    announce_reviews([row], s["out"])
    return row
