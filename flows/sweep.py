"""Flow ``sweep``: segment every complete scan in an inbox that the current model has not done yet.

Deployed on a schedule beside the event-triggered ``infer`` runs, so that nothing is missed while
the watcher was down. It leaves alone what is done (its record names this model, newer than the
files), what is still arriving (files changed less than ``settle_s`` ago) and what the watcher
announced a short while ago (``grace_s``: that triggered run is on its way); the rest goes to one
``infer`` subflow run.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from prefect.states import Failed

from flows.infer import infer
from flows.sections import documented, sections
from storage.cases import Naming
from storage.inbox import SWEEP_STATUSES, after_sweep, sweep_plan
from storage.outputs import made_with
from storage.registry import DEFAULT_ROOT, Registry
from tasks import report
from unet.predict import Prediction


@flow(name="sweep", log_prints=True)
@documented
def sweep(
    inbox: list[str],
    out: str,
    version: str | None = None,
    registry_url: str = DEFAULT_ROOT,
    naming: Naming = "auto",
    et_label: Literal[3, 4] | None = None,
    settle_s: float = 60.0,
    grace_s: float = 900.0,
    prediction: Prediction = Prediction(),
) -> dict:
    """Segment every complete scan in the inbox not yet segmented by the current model.

    Args:
        inbox: inbox folders: <case>/ or {HGG,LGG}/<case>/ with the four modalities
        settle_s: leave a scan whose files changed less than this many seconds ago (still arriving)
        grace_s: leave a scan the watcher announced less than this many seconds ago (its triggered run is on its way)
    """
    log = get_run_logger()
    (prediction,) = sections(prediction=prediction)
    shown = report.used(prediction=prediction)
    version = Registry(registry_url).resolve(version)

    def how(scan) -> dict:
        return made_with(version, prediction.tta, et_label or scan.case.et_label, prediction.postprocess)

    rows = sweep_plan(inbox, out, version, how, naming, settle_s=settle_s, grace_s=grace_s)
    pending = [r["path"] for r in rows if r["status"] == "pending"]
    counts = {s: sum(r["status"] == s for r in rows) for s in SWEEP_STATUSES}
    log.info("model %s: %s", version, counts)

    summary = {"version": version, "out": out, **counts, "written": 0, "skipped": 0, "failed": 0}
    state = None
    if pending:
        state = infer(pending, out, version, registry_url, naming, et_label, prediction, return_state=True)
        result = state.result(raise_on_failure=False)
        if isinstance(result, dict):
            summary.update({k: result[k] for k in ("written", "skipped", "failed") if k in result})
    report.sweep(out, summary, after_sweep(rows, out, version), shown)
    if state is not None and not state.is_completed():
        return Failed(message=f"infer: {state.message}", data=summary)
    return summary
