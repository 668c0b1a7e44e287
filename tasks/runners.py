"""Where a flow's mapped tasks run: Dask for ingestion, threads for prediction.

Ingestion (``dask_runner``): a local Dask cluster by default, an existing one by address.

``BRATS_DASK_ADDRESS`` (or ``brats ingest --dask-address``) names an existing scheduler, e.g.
``tcp://scheduler:8786``; otherwise each flow run starts a ``LocalCluster`` of
``BRATS_DASK_WORKERS`` single-threaded workers (default: one per core), without a dashboard.
The local workers are threads of this process unless ``BRATS_DASK_PROCESSES=1``: ingestion's
work releases the GIL (ISA-L inflate, numpy, blosc), threads start in a fraction of a second
where worker processes each import Prefect and the pipeline again (seconds, on a small run most of
the command), and nothing is pickled between them. Dask's own INFO lines (``distributed.*``:
scheduler, nanny, worker start and stop) stay out of the console, in this process and in any
worker processes it starts; warnings still show.

Prediction (``predict_runner``): ``BRATS_CASES_AT_ONCE`` cases at once (default 2) on threads of the
flow's process, so the model is loaded once; ``case_threads`` shares torch's threads between them,
``device_name`` checks the device.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from prefect.task_runners import ThreadPoolTaskRunner

from unet.device import cores, pick_device, torch_threads

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # read by the worker processes as they start
logging.getLogger("distributed").setLevel(os.environ["DASK_LOGGING__DISTRIBUTED"].upper())


class _NoDashboard(logging.Filter):
    """prefect-dask announces a dashboard link even when the cluster was started without one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("The Dask dashboard is available")


logging.getLogger("prefect.task_runner.dask").addFilter(_NoDashboard())


def dask_runner(
    address: str | None = None, workers: int | None = None, processes: bool | None = None
) -> DaskTaskRunner:
    from prefect_dask import DaskTaskRunner  # here: a flow without Dask (infer) starts without importing it

    address = address or os.environ.get("BRATS_DASK_ADDRESS") or None
    if address:
        return DaskTaskRunner(address=address)
    workers = workers or int(os.environ.get("BRATS_DASK_WORKERS", 0)) or os.cpu_count() or 1
    if processes is None:
        processes = os.environ.get("BRATS_DASK_PROCESSES", "0").lower() in ("1", "true", "yes")
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": processes,
            "dashboard_address": None,
        }
    )


def cluster_threads() -> int:
    """Worker threads of the running flow's Dask cluster, summed: 1 without one (or while it has no workers)."""
    from prefect.context import get_run_context

    client = getattr(get_run_context().task_runner, "client", None)
    return max(1, sum(client.nthreads().values())) if client is not None else 1


# Cases predicted at once (``BRATS_CASES_AT_ONCE``, default 2): one decodes, preprocesses or writes
# (one core, numpy) while the other predicts (torch). On a GPU more keep it fed.
CASES_AT_ONCE = max(1, int(os.environ.get("BRATS_CASES_AT_ONCE", 2)))


def predict_runner() -> ThreadPoolTaskRunner:
    """Threads, not processes: torch releases the GIL and the model is loaded once per process."""
    return ThreadPoolTaskRunner(max_workers=CASES_AT_ONCE)


def device_name(device: str = "auto") -> str:
    """The device a prediction flow passes to its tasks (checked here: ValueError when it is not there)."""
    return str(pick_device(device))


def case_threads(cases: int):
    """Cap torch's intra-op threads so that the cases predicted at once share the cores."""
    return torch_threads(cores() // max(1, min(CASES_AT_ONCE, cases)))
