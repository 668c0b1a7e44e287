"""Scale-out for real: ingestion on an existing Dask cluster by address, store and registry on S3.

The cluster is a ``dask scheduler`` and two ``dask worker`` processes started here, on loopback;
S3 is moto's server on loopback. The S3 endpoint and keys reach every process, the spawned Dask
workers included, through fsspec's own environment configuration (``FSSPEC_S3_<KWARG>``):
nothing in the code knows about S3.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flows.ingest import ingest
from storage.registry import Registry
from storage.store import SliceStore
from tasks.runners import dask_runner
from tests.helpers import free_port, stop
from unet.preprocess import Preprocessing

BIN = Path(sys.executable).parent


@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler and two single-threaded workers, each its own process, on 127.0.0.1."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # the workers get the API from each task's context, nothing else
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        out = open(logs / f"{name}.log", "wb")
        procs.append(
            subprocess.Popen(
                [str(BIN / "dask"), *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
        for name in ("w1", "w2"):
            start(
                name,
                "worker",
                address,
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--name",
                name,
                "--no-dashboard",
                "--host",
                "127.0.0.1",
            )
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            yield address, client
    finally:
        stop(procs)


@pytest.mark.slow
def test_ingest_runs_on_an_existing_cluster_by_address(prefect_api, dask_cluster, small_raw, small_store, tmp_path):
    address, client = dask_cluster
    workers = {info["name"]: addr for addr, info in client.scheduler_info()["workers"].items()}
    assert set(workers) == {"w1", "w2"}
    client.get_task_stream()  # installs the scheduler's task-stream plugin: from now on every task is recorded
    start = time.time()

    url = str(tmp_path / "slices.zarr")
    params = dict(raw=[str(small_raw)], store_url=url, data=Preprocessing(split_ratios=(0.5, 0.25, 0.25)))
    params["cases_per_task"] = 1  # a task run per case: six to share between the two workers
    state = ingest.with_options(task_runner=dask_runner(address=address))(**params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["ingested"] == 6 and summary["quarantined"] == 0

    # every case is in the store, identical to the one ingested without Dask or Prefect
    store, reference = SliceStore(url), SliceStore(small_store)
    assert store.case_ids() == reference.case_ids() and len(store.case_ids()) == 6
    case = store.case_ids()[0]
    assert np.array_equal(store.image(case)[:], reference.image(case)[:])

    # and the work was done by the two workers of that cluster, not by a LocalCluster of the flow
    stream = [t for t in client.get_task_stream(start=start) if t["key"].startswith("ingest_case")]
    assert len(stream) == 6, [t["key"] for t in stream]
    assert {t["worker"] for t in stream} == set(workers.values())

    # the workers had no PREFECT_API_URL, yet their task runs are on the flow's API
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as api:
        runs = api.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    ingest_runs = [r for r in runs if r.name.startswith("ingest-")]
    assert len(ingest_runs) == 6 and all(r.state.is_completed() for r in ingest_runs)


# ------------------------------------------------------------------ object storage


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 on loopback with a fresh bucket; fsspec configured from FSSPEC_S3_* environment variables."""
    import uuid

    import fsspec.config
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        env = {
            "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "FSSPEC_S3_KEY": "testing",
            "FSSPEC_S3_SECRET": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        for k, v in env.items():
            monkeypatch.setenv(k, v)  # for the processes started from here (Dask workers)
        parsed: dict = {}
        fsspec.config.set_conf_env(parsed, env)  # fsspec's own parser, as a fresh process runs it on import
        assert parsed["s3"]["endpoint_url"] == env["FSSPEC_S3_ENDPOINT_URL"]
        monkeypatch.setitem(fsspec.config.conf, "s3", parsed["s3"])  # this process imported fsspec already

        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = fsspec.filesystem("s3")
        bucket = f"brats-{uuid.uuid4().hex[:8]}"  # moto keeps its buckets for the life of this process
        fs.mkdir(bucket)
        yield fs, bucket
    finally:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.mark.slow
def test_slice_store_on_s3_ingested_by_dask_workers(prefect_api, s3, small_raw, small_store):
    fs, bucket = s3
    url = f"s3://{bucket}/slices.zarr"
    params = dict(raw=[str(small_raw)], store_url=url, data=Preprocessing(split_ratios=(0.5, 0.25, 0.25)))
    from distributed import LocalCluster

    # worker processes spawned afresh: they know the endpoint only from the environment
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        state = ingest.with_options(task_runner=dask_runner(address=cluster.scheduler_address))(
            **params, return_state=True
        )
        assert state.is_completed(), state.message
        assert state.result()["ingested"] == 6
        rerun = ingest.with_options(task_runner=dask_runner(address=cluster.scheduler_address))(
            **params, return_state=True
        )
        assert rerun.is_completed() and rerun.result()["skipped"] == 6  # unchanged cases are recognised on S3 too
    finally:
        cluster.close()

    assert fs.exists(f"{bucket}/slices.zarr/zarr.json")  # really on S3, not on some local path named s3:
    store, reference = SliceStore(url), SliceStore(small_store)
    assert store.case_ids() == reference.case_ids()
    assert store.profile == "full" and sorted(sum(store.split.values(), [])) == store.case_ids()
    for case in store.case_ids()[:2]:
        assert np.array_equal(store.image(case)[:], reference.image(case)[:])
        assert np.array_equal(store.label(case)[:], reference.label(case)[:])
        assert store.attrs(case)["sha256"] == reference.attrs(case)["sha256"]


def test_model_registry_on_s3(s3):
    fs, bucket = s3
    registry = Registry(f"s3://{bucket}/models")
    assert registry.versions() == [] and registry.best() is None
    first = registry.create({"profile": "tp", "metrics": {"dice_mean": 0.5}})
    second = registry.create({"profile": "tp", "metrics": {"dice_mean": 0.7}})
    url = registry.put(second, "weights.pt", b"\x00weights\xff" * 1000)
    assert url == f"s3://{bucket}/models/{second}/weights.pt"
    assert registry.get(second, "weights.pt") == b"\x00weights\xff" * 1000
    assert fs.cat(f"{bucket}/models/{second}/weights.pt") == b"\x00weights\xff" * 1000
    assert not [p for p in fs.find(f"{bucket}/models") if ".part" in p]  # the temporary names are gone

    registry.set_best(second)
    assert registry.best() == second == registry.resolve(None)
    assert [v["version"] for v in registry.versions()] == [first, second]  # oldest first
    assert [v["best"] for v in registry.versions()] == [v["version"] == second for v in registry.versions()]
    assert registry.update_info(first, status="complete")["status"] == "complete"

    fresh = Registry(f"s3://{bucket}/models")  # another reader, e.g. an inference worker
    assert fresh.best() == second and fresh.info(first)["status"] == "complete"
    with pytest.raises(FileNotFoundError):
        fresh.get(first, "weights.pt")
