"""The ingest flow for real: Prefect test API, a Dask LocalCluster of worker processes, Zarr on disk."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
from prefect.artifacts import Artifact

from flows.ingest import ingest
from storage.store import SliceStore
from storage.synth import make_case, write_case
from tasks.runners import dask_runner
from tests.conftest import SMALL
from unet.preprocess import Preprocessing


def _run(params: dict):
    state = ingest.with_options(task_runner=dask_runner(workers=2))(**params, return_state=True)
    return state, state.result(raise_on_failure=False)


@pytest.fixture
def raw(small_raw, real_case, tmp_path):
    """Six synthetic cases (HGG/LGG), the real case (flat) and one truncated case."""
    root = tmp_path / "raw"
    shutil.copytree(small_raw, root)
    shutil.copytree(real_case, root / real_case.name)
    bad = root / "HGG" / "BraTS19_BAD_0001_1"
    bad.mkdir()
    write_case(bad, bad.name, make_case(np.random.default_rng(1), SMALL, "HGG"), SMALL)
    flair = bad / f"{bad.name}_flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:1000])
    return root


def test_ingest_flow_quarantines_skips_and_reingests(prefect_api, raw, tmp_path):
    url = str(tmp_path / "slices.zarr")
    params = dict(
        raw=[str(raw)], store_url=url, data=Preprocessing(profile="tp")
    )  # tp: one 96x96 slice shape for any grid

    state, summary = _run(params)
    assert state.is_failed() and "1 case(s) quarantined" in state.message
    assert "BraTS19_BAD_0001_1_flair.nii.gz: truncated or corrupt gzip" in state.message
    assert summary["ingested"] == 7 and summary["skipped"] == 0 and summary["quarantined"] == 1
    store = SliceStore(url)
    assert len(store.case_ids()) == 7 and "BraTS19_BAD_0001_1" not in store.case_ids()
    assert sorted(sum(store.split.values(), [])) == store.case_ids()
    assert store.fingerprint == summary["fingerprint"]
    assert store.image("Brats18_2013_2_1").shape == (155, 4, 96, 96)
    assert store.image(store.case_ids()[0]).shape == (40, 4, 96, 96)  # a 64x64 synthetic grid, padded
    assert store.quarantine[0]["case"] == "BraTS19_BAD_0001_1"

    cases = Artifact.get("ingest-cases")
    rows = json.loads(cases.data) if isinstance(cases.data, str) else cases.data
    assert {r["case"] for r in rows} == set(store.case_ids())
    assert all(r["status"] == "ingested" and r["brain_voxels"] > 0 for r in rows)
    assert "truncated" in json.dumps(Artifact.get("ingest-quarantine").data)
    assert "Quarantined" in Artifact.get("ingest-summary").data
    assert Artifact.get("ingest-progress").data == 100.0

    before = {c: store.image(c)[:].copy() for c in store.case_ids()}
    first_fingerprint = store.fingerprint
    _, summary = _run(params)
    assert summary["skipped"] == 7 and summary["ingested"] == 0
    assert SliceStore(url).fingerprint == store.fingerprint

    changed = next((raw / "LGG").iterdir())
    t1, t2 = changed / f"{changed.name}_t1.nii.gz", changed / f"{changed.name}_t2.nii.gz"
    shutil.copy(t1, t2)
    shutil.rmtree(raw / "HGG" / "BraTS19_BAD_0001_1")
    state, summary = _run(params)
    assert state.is_completed()
    assert summary["ingested"] == 1 and summary["skipped"] == 6 and summary["quarantined"] == 0
    store = SliceStore(url)
    assert store.fingerprint == summary["fingerprint"] != first_fingerprint
    for c in store.case_ids():
        same = np.array_equal(store.image(c)[:], before[c])
        assert same == (c != changed.name), c


def test_transient_io_error_is_retried_invalid_data_is_not(prefect_api, small_raw, tmp_path, monkeypatch):
    import storage.nifti
    from storage.cases import discover
    from tasks.ingest import ingest_case

    real_read, calls, faults = storage.nifti.read_bytes, [], [2]

    def flaky(path):
        calls.append(path)
        if len(calls) in faults:  # one injected fault: the second file read of the first attempt
            faults.clear()
            raise OSError("injected: connection reset by object store")
        return real_read(path)

    monkeypatch.setattr(storage.nifti, "read_bytes", flaky)
    case = discover(small_raw).cases[0]
    url = str(tmp_path / "s.zarr")
    SliceStore(url, mode="a")
    state = ingest_case(case, url, "full", return_state=True)
    assert state.is_completed(), state
    assert state.result()["status"] == "ingested" and len(calls) > 5  # failed once, then re-read everything

    calls.clear()
    bad = tmp_path / "bad" / case.case_id
    shutil.copytree(small_raw / (case.grade or "") / case.case_id, bad)
    (bad / f"{case.case_id}_t1.nii.gz").write_bytes(b"\x1f\x8b garbage")
    state = ingest_case(discover(bad).cases[0], url, "full", return_state=True)
    assert state.is_failed() and "truncated or corrupt gzip" in state.message
    # one attempt, no retry: each file read once (the bytes hashed are the bytes decoded), then
    # decoding stops at the bad t1
    assert [c.rsplit("_", 1)[-1] for c in calls] == [
        "flair.nii.gz",
        "t1.nii.gz",
        "t1ce.nii.gz",
        "t2.nii.gz",
        "seg.nii.gz",
    ]


def _task_runs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as api:
        runs = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(r.name for r in runs)


def test_cases_unchanged_since_ingested_start_no_task(prefect_api, small_raw, tmp_path):
    """A scheduled run over unchanged files reads none of them: each case's files have the size and
    modification time recorded when it was ingested. Files rewritten with the same bytes are read and
    hashed once (a task), skipped, and known by their new stamps from then on."""
    raw = tmp_path / "raw"
    shutil.copytree(small_raw, raw)
    old = time.time() - 3600  # files written just now get no stamp (see storage.nifti.stamps)
    for f in raw.rglob("*.nii.gz"):
        os.utime(f, (old, old))
    params = dict(raw=[str(raw)], store_url=str(tmp_path / "s.zarr"), data=Preprocessing(profile="tp"))
    state, summary = _run(params)
    assert summary["ingested"] == 6 and len(_task_runs(state.state_details.flow_run_id)) == 3  # 2 threads: 3 runs of 2

    state, summary = _run(params)
    assert summary["skipped"] == 6 and summary["ingested"] == 0
    assert _task_runs(state.state_details.flow_run_id) == []
    fingerprint = summary["fingerprint"]

    t1 = next(raw.rglob("*_t1.nii.gz"))
    t1.write_bytes(t1.read_bytes())  # the same bytes, a new modification time
    os.utime(t1, (old + 60, old + 60))
    state, summary = _run(params)
    assert summary["skipped"] == 6 and summary["fingerprint"] == fingerprint
    assert _task_runs(state.state_details.flow_run_id) == [f"ingest-{t1.parent.name}"]
    state, _ = _run(params)
    assert _task_runs(state.state_details.flow_run_id) == []

    state, summary = _run({**params, "rehash": True})  # every file read and hashed again
    assert summary["skipped"] == 6 and len(_task_runs(state.state_details.flow_run_id)) == 3

    shutil.copy(t1.with_name(t1.name.replace("_t1.", "_t2.")), t1)  # changed bytes: read, and ingested again
    os.utime(t1, (old + 120, old + 120))
    state, summary = _run(params)
    assert summary["ingested"] == 1 and summary["skipped"] == 5
    assert _task_runs(state.state_details.flow_run_id) == [f"ingest-{t1.parent.name}"]
