"""Fault injection: kill -9 at random points; nothing half-done is ever visible.

* Ingestion killed (SIGKILL) at 12 points — 8 chosen at random among the files the store writes
  (just before or just after the k-th), 4 at random times — then rerun: every case readers can see
  after the kill is whole and right, and the rerun ends with the store a clean run makes
  (array checksums, case attrs, split, fingerprint).
* The real ``brats ingest`` CLI killed (its whole process group: CLI and Dask workers) mid-run,
  then rerun to completion: same store as a clean run.
* Inference killed mid-write (half the bytes in the temp file; written but not renamed; renamed
  but the record not yet written) and at random times: no partial NIfTI at any output path, a
  record never without its segmentation, and the rerun completes with a clean run's outputs.

Kill trials run ``tasks.ingest.ingest_case.fn`` / ``tasks.infer.infer_case.fn`` (no Prefect: the
storage layer is what is under test) in children forked from one "zygote" process, so the imports
(Prefect, torch) are paid once, not per trial. Training killed mid-epoch: ``tests/test_train.py``;
transient I/O errors: ``tests/test_retries.py``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from storage.store import SliceStore
from tests.conftest import child_env
from tests.helpers import (
    case_snapshot,
    infer_snapshot,
    ingest_all,
    register_model,
    segmentation_snapshot,
    store_snapshot,
    synth_raw,
)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- what a kill leaves


def half_written(url: str) -> list[str]:
    """Case groups on disk that are not complete (what a killed writer leaves)."""
    try:
        cases = zarr.open_group(url, mode="r")["cases"]
    except (KeyError, FileNotFoundError):
        return []
    return sorted(name for name, g in cases.groups() if g.attrs.get("complete") is not True)


def assert_visible_cases_whole(url: str, clean: dict) -> None:
    """Whatever a reader can list is a whole, correct case."""
    store = SliceStore(url)
    for case_id in store.case_ids():
        assert case_snapshot(store, case_id) == clean["cases"][case_id], f"{case_id} is visible but not whole"


# ----------------------------------------------------------------------------- the zygote

ZYGOTE = r'''
import json, os, signal, sys, threading, traceback
import torch                      # every import before any fork: a trial costs a fork, not 7 s
import tasks.infer, tasks.ingest, zarr.storage._local
from tests.helpers import infer_all, ingest_all


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm_store(k, when, count):
    """SIGKILL at the k-th file the Zarr store writes (zarr's own write is temp file + rename)."""
    real, lock = zarr.storage._local._put, threading.Lock()

    def put(path, value, exclusive=False):  # runs in zarr's I/O threads, several at once
        with lock:
            count[0] += 1
            mine = count[0]
        if mine == k and when == "before":
            die()
        try:
            return real(path, value, exclusive=exclusive)  # an exclusive write may fail: zarr expects that
        finally:
            if mine == k and when == "after":
                die()

    zarr.storage._local._put = put


def arm_outputs(k, when, count, out):
    """SIGKILL inside the k-th file written in the output folder (storage.nifti.atomic_write_bytes):
    "mid" with half its bytes written, "before" its rename into place, "after" the rename."""
    real_fdopen, real_replace = os.fdopen, os.replace
    out = os.path.realpath(out)

    def is_part(fd_or_path):
        p = os.readlink(f"/proc/self/fd/{fd_or_path}") if isinstance(fd_or_path, int) else os.path.realpath(fd_or_path)
        return os.path.dirname(p) == out

    class Half:
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *a):
            return self.f.__exit__(*a)
        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            os.fsync(self.f.fileno())
            die()
        def __getattr__(self, name):
            return getattr(self.f, name)

    def fdopen(fd, *a, **kw):
        f = real_fdopen(fd, *a, **kw)
        if is_part(fd):
            count[0] += 1
            if count[0] == k and when == "mid":
                return Half(f)
        return f

    def replace(src, dst, *a, **kw):
        if count[0] == k and when == "before" and is_part(src):
            die()
        real_replace(src, dst, *a, **kw)
        if count[0] == k and when == "after" and is_part(src):
            die()

    os.fdopen, os.replace = fdopen, replace


def child(t):
    torch.set_num_threads(1)
    count = [0]  # files written; a clean run reports how many, so kill points can be drawn among them
    k, when = t.get("kill") or (None, None)
    if t["job"] == "ingest":
        arm_store(k, when, count)
    else:
        arm_outputs(k, when, count, t["out"])
    if t["job"] == "ingest":
        ingest_all(t["raw"], t["store"])
    else:
        t["statuses"] = infer_all(t["raw"], t["out"], t["models"], t["version"])
    return count[0]


print("ready", flush=True)
for line in sys.stdin:
    t = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            t["count"] = child(t)
        except BaseException:
            t["error"], code = traceback.format_exc(), 3
        with open(t["report"], "w") as f:
            json.dump(t, f)
        os._exit(code)
    if t.get("delay") is not None:
        import time
        time.sleep(t["delay"])
        os.kill(pid, signal.SIGKILL)  # a zombie takes the signal harmlessly if it already ended
    _, status = os.waitpid(pid, 0)
    result = {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
              "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
    if os.path.exists(t["report"]):
        result.update(json.load(open(t["report"])))
    print(json.dumps(result), flush=True)
'''


class Zygote:
    def __init__(self, tmp: Path):
        script = tmp / "zygote.py"
        script.write_text(ZYGOTE)
        env = child_env(OMP_NUM_THREADS="1")
        self.tmp, self.n = tmp, 0
        self.proc = subprocess.Popen(
            [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, **trial) -> dict:
        self.n += 1
        trial["report"] = str(self.tmp / f"report-{self.n}.json")
        start = time.monotonic()
        self.proc.stdin.write(json.dumps(trial) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        result = json.loads(line)
        result["seconds"] = time.monotonic() - start
        assert "error" not in result, result["error"]
        return result

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


# ----------------------------------------------------------------------------- ingestion killed


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized")  # zarr's temp file left by a kill: harmless
def test_ingest_killed_at_random_points_then_rerun_equals_a_clean_run(zygote, tmp_path):
    raw = synth_raw(tmp_path / "raw")
    clean_url = str(tmp_path / "clean.zarr")
    clean = zygote.run(job="ingest", raw=str(raw), store=clean_url)
    assert clean["exit"] == 0 and clean["count"] > 10
    reference = store_snapshot(clean_url)
    assert len(reference["cases"]) == 3 and reference["root"]["fingerprint"]

    rng = random.Random(20261125)
    trials = [{"kill": [k, rng.choice(["before", "after"])]} for k in rng.sample(range(1, clean["count"] + 1), 8)]
    trials += [{"delay": rng.uniform(0.0, 0.9 * clean["seconds"])} for _ in range(4)]
    seen_half = 0
    for i, trial in enumerate(trials):
        url = str(tmp_path / f"trial{i}.zarr")
        result = zygote.run(job="ingest", raw=str(raw), store=url, **trial)
        if "kill" in trial:
            assert result["signal"] == signal.SIGKILL, (trial, result)
        if (Path(url) / "zarr.json").exists():  # else killed before the store existed: nothing to see
            assert_visible_cases_whole(url, reference)
            seen_half += bool(half_written(url))
        ingest_all(raw, url)  # the rerun
        assert store_snapshot(url) == reference, trial
        assert not half_written(url)
    assert seen_half >= 2, "no trial killed a writer mid-case: the test proves nothing"


def test_killing_the_brats_ingest_cli_and_rerunning_it(prefect_api, tmp_path):
    raw = synth_raw(tmp_path / "raw", cases=4)
    clean_url = str(tmp_path / "clean.zarr")
    ingest_all(raw, clean_url)
    reference = store_snapshot(clean_url)
    url = tmp_path / "cli.zarr"
    brats = Path(sys.executable).with_name("brats")
    cmd = [str(brats)] if brats.exists() else [sys.executable, "-m", "flows.cli"]
    cmd += ["ingest", str(raw), "--store", str(url), "--workers", "1"]
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "OMP_NUM_THREADS": "1",
    }

    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 240
        while not list(url.glob("cases/*/zarr.json")):  # the first case is being written: mid-run
            assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "the CLI wrote no case in time"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI with its Dask workers and temporary API, like a node going away
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    deadline = time.monotonic() + 30
    while True:  # every process of the group gone (no orphaned Dask worker still writing)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "processes of the killed CLI survive"
        time.sleep(0.1)
    assert proc.returncode == -signal.SIGKILL
    assert SliceStore(str(url)).fingerprint is None, "the run had already finished: not killed mid-run"
    assert_visible_cases_whole(str(url), reference)

    ingest_all(raw, str(url))  # the rerun (the flow's own rerun path is tests/test_ingest_flow.py)
    assert store_snapshot(str(url)) == reference
    assert not half_written(str(url))


# ----------------------------------------------------------------------------- inference killed


def test_inference_killed_mid_write_leaves_no_partial_output_and_the_rerun_completes(zygote, tmp_path):
    raw = synth_raw(tmp_path / "raw", with_seg=False)
    models = tmp_path / "models"
    version = register_model(models)
    job = dict(job="infer", raw=str(raw), models=str(models), version=version)
    clean = zygote.run(out=str(tmp_path / "clean"), **job)
    assert clean["exit"] == 0 and clean["count"] == 6  # 3 cases x (segmentation, record)
    reference = infer_snapshot(tmp_path / "clean")
    assert len(reference) == 6

    rng = random.Random(7)
    trials = [{"kill": [1, "mid"]}, {"kill": [1, "before"]}, {"kill": [1, "after"]}, {"kill": [2, "mid"]}]
    trials += [{"kill": [rng.randint(3, 6), rng.choice(["mid", "before", "after"])]} for _ in range(2)]
    trials += [{"delay": rng.uniform(0.3, 0.9) * clean["seconds"]} for _ in range(2)]
    leftovers = 0
    for i, trial in enumerate(trials):
        out = tmp_path / f"out{i}"
        result = zygote.run(out=str(out), **job, **trial)
        if "kill" in trial:
            assert result["signal"] == signal.SIGKILL, (trial, result)
        outputs = sorted(out.glob("[!.]*")) if out.exists() else []
        for path in outputs:  # every file at an output path is whole, and the clean run's
            if path.name.endswith("_seg.nii.gz"):
                try:
                    got = segmentation_snapshot(path)
                except Exception as e:
                    pytest.fail(f"{trial}: a partial NIfTI at the output path {path.name}: {type(e).__name__}: {e}")
                assert got == reference[path.name], (trial, path.name)
            else:
                assert path.name.endswith(".json") and (out / path.name.replace(".json", "_seg.nii.gz")).exists(), (
                    trial,
                    path.name,
                )
        leftovers += len(list(out.glob(".*.part"))) if out.exists() else 0
        rerun = zygote.run(out=str(out), **job)  # a fresh process, as after a crash
        assert rerun["exit"] == 0 and rerun["statuses"].count("skipped") == sum(p.suffix == ".json" for p in outputs)
        assert infer_snapshot(out) == reference, trial
    assert leftovers >= 3  # the "mid"/"before" kills did die with a temp file open: they hit the write
