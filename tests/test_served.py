"""``brats serve``: a real task-worker process on the test API, scans sent by ``submit --served``.

The process loads the model once; each submitted scan becomes a ``segment-scan`` task run there and
writes what ``brats infer`` writes. A bad scan fails its own task run with a one-line reason and the
process keeps serving; a new best model is used from the next scan on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import nibabel as nib
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId, TaskRunFilter, TaskRunFilterName

from flows.cli.events import submit
from storage.registry import Registry
from tests.helpers import register_model

pytestmark = pytest.mark.slow


def written(out, case_id: str, timeout: float = 120) -> dict:
    record = out / f"{case_id}.json"
    deadline = time.monotonic() + timeout
    while not record.exists():
        assert time.monotonic() < deadline, f"no {record} after {timeout:.0f} s"
        time.sleep(0.1)
    return json.loads(record.read_text())


def task_runs(name: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])))


def task_run_logs(task_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        found = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])))
    return [log.message for log in found]


def test_served_scans_are_segmented_by_the_warm_process_and_a_bad_one_fails_alone(prefect_api, small_raw, tmp_path):
    models, out, inbox = tmp_path / "models", tmp_path / "out", tmp_path / "inbox"
    first = register_model(models)
    for src in sorted((small_raw / "HGG").iterdir())[:2]:
        shutil.copytree(src, inbox / src.name)
    cases = sorted(p.name for p in inbox.iterdir())
    bad = inbox / "BAD_1"
    shutil.copytree(inbox / cases[0], bad)
    for f in bad.iterdir():
        f.rename(bad / f.name.replace(cases[0], "BAD_1"))
    (bad / "BAD_1_t1.nii.gz").write_bytes(b"\x1f\x8b garbage")

    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_LOGGING_LEVEL": "INFO"}
    command = [sys.executable, "-m", "flows.cli", "serve", "--out", str(out), "--registry", str(models)]
    console = tmp_path / "serve.log"
    server = subprocess.Popen(command, env=env, stdout=console.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while f"serving segment-scan: model {first}" not in console.read_text():
            assert server.poll() is None and time.monotonic() < deadline, console.read_text()
            time.sleep(0.2)
        time.sleep(1.0)  # subscribed right after it says so
        assert submit([str(bad), str(inbox / cases[0])], served=True) == 0
        record = written(out, cases[0])
        assert record["model_version"] == first
        seg = nib.load(out / f"{cases[0]}_seg.nii.gz")
        reference = nib.load(next((inbox / cases[0]).glob("*_flair.nii.gz")))
        assert seg.shape == reference.shape and (seg.affine == reference.affine).all()

        deadline = time.monotonic() + 60
        while not (runs := [r for r in task_runs("segment-BAD_1") if r.state and r.state.is_final()]):
            assert time.monotonic() < deadline, "the bad scan's task run never ended"
            time.sleep(0.2)
        assert runs[0].state.is_failed() and "truncated or corrupt gzip" in runs[0].state.message
        assert not (out / "BAD_1_seg.nii.gz").exists()
        (done,) = task_runs(f"segment-{cases[0]}")
        assert done.state.is_completed()
        assert {"served", f"case:{cases[0]}"} <= set(done.tags)  # found in the UI by its case
        deadline = time.monotonic() + 30  # its logs are on its page: what was segmented, by which model
        while not any(" by " in m for m in task_run_logs(done.id)):
            assert time.monotonic() < deadline, f"no logs in the served task run: {task_run_logs(done.id)}"
            time.sleep(0.5)
        logs = task_run_logs(done.id)
        assert any(str(out / f"{cases[0]}_seg.nii.gz") in m and first in m for m in logs), logs

        second = register_model(models, seed=1)  # a new best: the next scan uses it, in the same process
        assert Registry(str(models)).best() == second
        assert submit([str(inbox / cases[1])], served=True) == 0
        assert written(out, cases[1])["model_version"] == second
        assert server.poll() is None  # still serving
    finally:
        server.terminate()
        server.wait(timeout=30)
