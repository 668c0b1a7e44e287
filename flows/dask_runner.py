"""Which Dask cluster runs mapped tasks: a local one by default, an existing one by address.

``BRATS_DASK_ADDRESS`` (or ``--dask-address``) names an existing scheduler, e.g.
``tcp://scheduler:8786``; otherwise each flow run starts a ``LocalCluster`` of
``BRATS_DASK_WORKERS`` single-threaded worker processes (default: one per core).
"""

from __future__ import annotations

import os

from prefect_dask import DaskTaskRunner


def dask_runner(address: str | None = None, workers: int | None = None) -> DaskTaskRunner:
    address = address or os.environ.get("BRATS_DASK_ADDRESS") or None
    if address:
        return DaskTaskRunner(address=address)
    workers = workers or int(os.environ.get("BRATS_DASK_WORKERS", 0)) or os.cpu_count() or 1
    return DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    )
