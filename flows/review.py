"""Flow ``review``: a segmentation flagged for review -> a row of the output folder's review list.

Started by each ``brats.segmentation.review`` event (inference emits one per segmentation its quality
estimate flags; ``unet/quality.py``) through the ``review/list`` deployment: reads the case's record,
appends it to ``<out>/review.csv`` (once per case and model version) and leaves an artifact naming
the case and why. An operator may add a notification to the same automation.
"""

from __future__ import annotations

import json

from prefect import flow, get_run_logger

from storage.outputs import add_to_review_list, outputs
from tasks.artifacts import markdown


@flow(name="review", log_prints=True)
def review(case: str, out: str) -> dict:
    """Add a flagged segmentation to the review list of its output folder.

    Args:
        case: the case id of the flagged segmentation
        out: the output folder inference wrote it to
    """
    record = json.loads(outputs(out, case)[1].read_text())
    path = add_to_review_list(out, record)
    reasons = "; ".join(record.get("review_reasons", [])) or "no reason recorded"
    get_run_logger().info("%s (model %s) to review: %s -> %s", case, record["model_version"], reasons, path)
    markdown(f"# {case}: to review\n\n{reasons}\n\nList: `{path}`", "review-case", f"{case} flagged for review")
    return {"case": case, "review_list": str(path), "reasons": record.get("review_reasons", [])}
