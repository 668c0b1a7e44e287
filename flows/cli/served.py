"""``brats serve``: each submitted scan segmented in seconds, by a model kept warm in one process.

    brats serve --out SEGMENTATIONS [--registry R] [--version V] [prediction options]
    brats submit CASE_FOLDER --served             # or: brats watch INBOX --served

The event path (``brats.scan.arrived`` -> the ``infer/scans`` deployment) starts a new flow-run
process for every scan: Python, Prefect and torch imports and the model load come before the first
voxel, and the worker polls for the run first. It scales out over a work pool, but a single scan
takes tens of seconds. ``brats serve`` is the low-latency path: a long-lived Prefect task worker
(``prefect.task_worker.serve``) of the ``segment-scan`` task (``tasks/served.py``). It loads the
model and runs it once before it takes scans, then receives each submitted scan over the server's
websocket the moment it is sent, in this warm process. Why a task worker and not long-lived Dask
workers behind the deployment: the flow-run process would still start cold for every scan; here
nothing starts per scan.

Each scan is a task run of ``segment-scan`` in the UI (Runs -> Task runs) with a table artifact, and
writes what ``brats infer`` writes (``<out>/<case>_seg.nii.gz`` + ``<case>.json``, skipped when
already made the same way). Several ``brats serve`` processes (one per GPU, or per machine) share
the submitted scans. A submitted task's parameters travel through Prefect's task-scheduling
storage, local by default (``PREFECT_LOCAL_STORAGE_PATH``): across machines, point
``PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK`` at shared storage.
"""

from __future__ import annotations

import time
from typing import Literal

from storage.registry import DEFAULT_ROOT
from unet.predict import Prediction


def serve(
    out: str,
    registry_url: str = DEFAULT_ROOT,
    version: str | None = None,
    et_label: Literal[3, 4] | None = None,
    prediction: Prediction = Prediction(),
    limit: int = 1,
) -> int:
    """Segment each scan sent by `brats submit --served` / `brats watch --served`, with the model kept warm.

    Args:
        out: output folder
        version: model version, 'latest', or empty for the best (resolved again for every scan)
        registry_url: model registry: a local path or an fsspec URL
        et_label: label written for enhancing tumour: 4 (BraTS up to 2021) or 3 (2023+); empty: each input's own edition
        prediction: how scans are segmented
        limit: scans segmented at once (1 on a CPU: each gets every core; 2 on a GPU keeps it fed)
    """
    import numpy as np
    import torch
    from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings
    from prefect.task_worker import serve as task_worker

    from storage.registry import Registry
    from tasks import served
    from tasks.runners import device_name
    from unet.checkpoint import cached_model
    from unet.device import cores
    from unet.predict import predict_slices
    from unet.preprocess import PROFILES

    device = device_name(prediction.device)
    torch.set_num_threads(max(1, cores() // limit))
    resolved = Registry(registry_url).resolve(version)
    model, info = cached_model(registry_url, resolved, device)
    profile = PROFILES[info.profile]
    side = (profile.window or 240) // profile.factor
    predict_slices(model, np.ones((2, 4, side, side), np.float32), device=device)  # the scans' own path, warmed up
    served.SETTINGS.update(
        out=out,
        registry_url=registry_url,
        version=version,
        prediction=prediction.model_copy(update={"device": device}),
        et_label=et_label,
    )
    print(
        f"{time.strftime('%H:%M:%S')} serving segment-scan: model {resolved} ({info.profile}) on {device} -> {out}",
        flush=True,
    )
    # a served task run has no flow run: its logs go to the task run's page; what Prefect logs outside
    # any run (the task worker itself) stays on this console, without a warning for each line
    with temporary_settings({PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
        task_worker(served.segment_scan, limit=limit)
    return 0
