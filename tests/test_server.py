"""Serving new scans, and the whole thing on a real Prefect server.

Without a server: the watcher (complete = four modalities, unchanged across two polls; once per
version of the files; state survives a restart) and the sweep flow (done / arriving / announced /
pending).

With a server: ``prefect server start`` on 127.0.0.1 (SQLite, its own PREFECT_HOME, basic auth as in
deploy/docker-compose.yml), the pools, the "gpu" concurrency limit and every deployment of
deploy/prefect.yaml made by deploy/bootstrap.sh as the README gives it (process pools), a process
worker per pool. Then, for real: the ingest deployment runs on the cpu worker and its artifacts are
read through the REST API; two trainings overlap in the gpu pool (one started by `prefect deployment
run --param` with one field of a section, the deployment's others kept) and each version they
announce is evaluated once; a training whose process is killed is started again by its automation
and ends with the weights of an uninterrupted run; ``brats submit`` emits ``brats.scan.arrived`` and
the triggered inference run writes the segmentation; the sweep deployment segments the scan left
over and leaves the done one alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flows.cli.events import EVENT, scan_event
from flows.sweep import sweep
from storage.brats import MODALITIES
from storage.inbox import STATE_NAME, Watcher, record, scan_inbox
from storage.registry import Registry
from unet.checkpoint import save_model
from unet.model import UNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
AUTH = "brats:not-a-secret"  # the server's basic auth, as docker-compose sets it up


def register(root: Path, seed: int = 0) -> str:
    """A tiny untrained model ('full' profile) as the registry's best version."""
    registry = Registry(str(root))
    version = registry.create({"profile": "full", "status": "complete"})
    torch.manual_seed(seed)
    save_model(registry, version, UNet(UNetConfig(base_channels=4, depth=2, padding="same")))
    registry.set_best(version)
    return version


def new_scan(src: Path, inbox: Path, name: str | None = None, channels=MODALITIES) -> Path:
    """Copy a case's scans (no seg) into the inbox, renamed to ``name``."""
    name = name or src.name
    case = inbox / name
    case.mkdir(parents=True, exist_ok=True)
    for c in channels:
        shutil.copyfile(src / f"{src.name}_{c}.nii.gz", case / f"{name}_{c}.nii.gz")
    return case


def sources(small_raw: Path) -> list[Path]:
    return sorted(p for p in small_raw.glob("*/*") if p.is_dir())


# ------------------------------------------------------------------ the watcher


def test_watcher_emits_each_complete_stable_scan_once(small_raw, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    src = sources(small_raw)
    sent: list = []
    watcher = Watcher(inbox, emit=lambda scans: sent.extend(scan_event(s, "watch") for s in scans))

    case = new_scan(src[0], inbox, "NEW_001", channels=MODALITIES[1:])  # flair not there yet
    assert watcher.poll() == [] and watcher.poll() == [] and sent == []
    new_scan(src[0], inbox, "NEW_001", channels=["flair"])
    assert watcher.poll() == []  # complete, but seen once: it may still be growing
    assert [s.case.case_id for s in watcher.poll()] == ["NEW_001"]
    (event,) = sent
    assert event.event == EVENT == "brats.scan.arrived"
    assert event.resource.id == "brats.scan.NEW_001"
    assert event.payload["path"] == str(case.resolve()) and event.payload["case"] == "NEW_001"
    assert event.payload["naming"] == "auto" and set(event.payload["files"]) == set(MODALITIES)
    assert watcher.poll() == [] and len(sent) == 1  # once

    restarted = Watcher(
        inbox, emit=lambda scans: sent.extend(scan_event(s, "watch") for s in scans)
    )  # the state file remembers
    assert restarted.poll() == [] and restarted.poll() == [] and len(sent) == 1
    assert json.loads((inbox / STATE_NAME).read_text())["emitted"]["NEW_001"]["path"] == str(case.resolve())

    # a scan still being written is not announced until its sizes stop changing
    growing = new_scan(src[1], inbox, "NEW_002")
    (inbox / ".upload-NEW_003").mkdir()  # hidden: a sender assembling a case
    new_scan(src[2], inbox / ".upload-NEW_003", "NEW_003")
    assert restarted.poll() == []
    with open(growing / "NEW_002_t2.nii.gz", "ab") as f:
        f.write(b"\0" * 10)
    assert restarted.poll() == []
    assert [s.case.case_id for s in restarted.poll()] == ["NEW_002"]

    # the same case with new files is a new scan: announced again, once
    t1 = case / "NEW_001_t1.nii.gz"
    os.utime(t1, ns=(t1.stat().st_atime_ns, t1.stat().st_mtime_ns + 10**9))
    assert restarted.poll() == []
    assert [s.case.case_id for s in restarted.poll()] == ["NEW_001"] and restarted.poll() == []
    assert [e.resource.id for e in sent] == ["brats.scan.NEW_001", "brats.scan.NEW_002", "brats.scan.NEW_001"]


def test_brats_watch_announces_a_scan_seconds_after_its_last_file(prefect_api, small_raw, tmp_path):
    """File-system events, not a poll interval: a scan copied in file by file is announced about
    ``settle`` seconds after its last file is written, once, and not while a modality is missing."""
    import threading

    from flows.cli.events import watch
    from storage.inbox import load_state

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    looks = threading.Thread(target=watch, args=(str(inbox),), kwargs={"settle": 0.5, "interval": 60, "max_polls": 12})
    looks.start()
    time.sleep(1.0)  # the watcher is up
    src = sources(small_raw)[0]
    new_scan(src, inbox, "NEW_001", channels=("flair", "t1", "t1ce"))
    time.sleep(1.5)
    assert "NEW_001" not in load_state(inbox / STATE_NAME)  # t2 still missing: not complete
    new_scan(src, inbox, "NEW_001", channels=("t2",))
    written = time.monotonic()
    while "NEW_001" not in load_state(inbox / STATE_NAME) and time.monotonic() - written < 10:
        time.sleep(0.05)
    seconds = time.monotonic() - written
    for i in range(150):  # more file events, each a look, until the watcher has had its 12 looks
        if not looks.is_alive():
            break
        (inbox / f"noise-{i}.txt").write_text("x")
        time.sleep(0.2)
    assert not looks.is_alive()
    assert "NEW_001" in load_state(inbox / STATE_NAME) and seconds < 4, seconds  # settle + debounce, not 30 s


def test_watcher_does_not_forget_a_scan_when_the_api_is_down(small_raw, tmp_path):
    inbox = tmp_path / "inbox"
    new_scan(sources(small_raw)[0], inbox, "NEW_001")
    sent: list = []

    def flaky(scans):
        if not sent:
            sent.append("refused")
            raise OSError("connection refused")
        sent.extend(scan_event(s, "watch") for s in scans)

    watcher = Watcher(inbox, emit=flaky)
    assert watcher.poll() == []
    with pytest.raises(OSError):
        watcher.poll()
    assert not (inbox / STATE_NAME).exists()
    assert [s.case.case_id for s in watcher.poll()] == ["NEW_001"]  # the next poll delivers it
    assert sent[1].resource.id == "brats.scan.NEW_001"


# ------------------------------------------------------------------ the sweep flow


def test_sweep_segments_what_is_missing_and_only_that(prefect_api, small_raw, tmp_path):
    models, out, inbox = tmp_path / "models", tmp_path / "out", tmp_path / "inbox"
    version = register(models)
    src = sources(small_raw)
    for i in range(3):
        new_scan(src[i], inbox, f"NEW_00{i}")
    complete, _ = scan_inbox(inbox)
    record(inbox / STATE_NAME, [complete["NEW_002"]], "watch")  # announced a moment ago: its run is on its way
    params = dict(inbox=[str(inbox)], out=str(out), registry_url=str(models), settle_s=0.0)

    state = sweep(**params, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["pending"], summary["announced"], summary["written"], summary["version"]) == (2, 1, 2, version)
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == ["NEW_000_seg.nii.gz", "NEW_001_seg.nii.gz"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    new_scan(src[3], inbox, "NEW_003")  # still arriving
    summary = sweep(**{**params, "settle_s": 3600.0}, return_state=True).result()
    assert (summary["done"], summary["announced"], summary["arriving"], summary["pending"]) == (2, 1, 1, 0)
    assert summary["written"] == 0 and not (out / "NEW_003.json").exists()

    summary = sweep(**{**params, "grace_s": 0.0}, return_state=True).result()  # the watcher's run never came
    assert (summary["done"], summary["pending"], summary["written"]) == (2, 2, 2)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in stamps} == stamps  # nothing done twice
    done = json.loads((out / "NEW_003.json").read_text())
    assert done["model_version"] == version and done["inputs"]["flair"] == str(
        inbox / "NEW_003" / "NEW_003_flair.nii.gz"
    )


# ------------------------------------------------------------------ a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(procs: list[subprocess.Popen], grace: float = 15) -> None:
    """SIGTERM each process group, then SIGKILL what is still there after the grace period."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


class Stack:
    """The running server, its workers, their logs, and a REST client."""

    def __init__(self, api: str, env: dict, data: Path, logs: Path):
        import httpx

        self.api, self.env, self.data, self.logs = api, env, data, logs
        user, password = AUTH.split(":")
        self.http = httpx.Client(base_url=api, timeout=30, auth=httpx.BasicAuth(user, password))

    def request(self, method: str, path: str, body: dict | None = None):
        """One REST call; a 503 (SQLite busy under load: "database is locked") is tried again."""
        for attempt in range(5):
            r = self.http.request(method, path, json=body)
            if r.status_code != 503 or attempt == 4:
                r.raise_for_status()
                return r.json()
            time.sleep(2)

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body: dict):
        return self.request("POST", path, body)

    def deployment(self, name: str) -> dict:
        return self.get(f"/deployments/name/{name}")

    def run(self, deployment: str, params: dict) -> str:
        """A flow run of a deployment with these parameters (the server adds the deployment's others)."""
        return self.post(f"/deployments/{self.deployment(deployment)['id']}/create_flow_run", {"parameters": params})[
            "id"
        ]

    def runs_of(self, deployment: str) -> list[dict]:
        return self.post("/flow_runs/filter", {"deployments": {"id": {"any_": [self.deployment(deployment)["id"]]}}})

    def artifacts(self, flow_run_id: str) -> dict[str, dict]:
        return {
            a["key"]: a
            for a in self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
            if a["key"]
        }

    def wait(self, flow_run_id: str, timeout: float = 150) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.get(f"/flow_runs/{flow_run_id}")
            if run["state"]["type"] in TERMINAL:
                assert run["state"]["type"] == "COMPLETED", f"{run['name']}: {run['state']['message']}\n{self.tail()}"
                return run
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"flow run {run['name']} still {run['state']['name']} after {timeout}s\n{self.tail()}"
                )
            time.sleep(1)

    def until(self, what: str, check, timeout: float = 150):
        deadline = time.monotonic() + timeout
        while not (found := check()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout}s\n{self.tail()}")
            time.sleep(1)
        return found

    def tail(self, n: int = 4000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in sorted(self.logs.glob("*.log")))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, small_raw):
    """Server + bootstrap.sh (pools, concurrency limit, deployments) + one process worker per pool."""
    base = tmp_path_factory.mktemp("server")
    home, data, logs = base / "prefect-home", base / "data", base / "logs"
    for d in (home, data / "raw", data / "inbox", logs):
        d.mkdir(parents=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BRATS_"))}
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": api,
            "PREFECT_UI_API_URL": api,  # a port other than 4200: the UI must be told where its API is
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_AUTH_STRING": AUTH,  # the server asks every client for it ...
            "PREFECT_API_AUTH_STRING": AUTH,  # ... and every client (CLI, workers, flow runs, brats) gives it
            "PREFECT_LOGGING_LEVEL": "INFO",
            "BRATS_REPO": str(ROOT),
            "BRATS_DATA": str(data),
            "BRATS_STORAGE": str(data),
            "BRATS_DASK_WORKERS": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        }
    )
    shutil.copytree(small_raw, data / "raw", dirs_exist_ok=True)
    register(data / "models")
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "wb")
        p = subprocess.Popen(
            [str(BIN / "prefect"), *args],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(p)
        return p

    stack = Stack(api, env, data, logs)
    try:
        server = start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        deadline = time.monotonic() + 120
        while True:
            try:
                if stack.http.get("/health").status_code == 200:
                    break
            except Exception:
                pass
            assert server.poll() is None and time.monotonic() < deadline, f"the server did not come up\n{stack.tail()}"
            time.sleep(0.5)
        # the workers start beside bootstrap.sh (a pool not made yet is made as a process pool)
        start("worker-cpu", "worker", "start", "--pool", "cpu", "--type", "process", "--name", "cpu-1")
        start("worker-gpu", "worker", "start", "--pool", "gpu", "--type", "process", "--name", "gpu-1")
        boot = subprocess.run(
            [str(ROOT / "deploy" / "bootstrap.sh")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        (logs / "bootstrap.log").write_text(boot.stdout + boot.stderr)
        assert boot.returncode == 0, stack.tail()
        yield stack
    finally:
        stop(procs[1:])  # the workers first, while their server still answers
        stop(procs[:1])


TINY_NETWORK = {"base_channels": 4, "depth": 2, "context": 0}  # the recipe's padding "same", norm "batch" kept
TINY_TRAINING = {
    "folds": 0,
    "epochs": 1,
    "batch_size": 4,
    "max_steps_per_epoch": 2,
    "workers": 0,
    "device": "cpu",
}  # its lr, weights … kept


def flow_run_process(flow_run_id: str) -> int | None:
    """The pid of the process a worker started for a flow run (its environment names the run)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in (
                proc / "environ"
            ).read_bytes().split(b"\0"):
                return int(proc.name)
        except OSError:
            continue
    return None


@pytest.fixture(scope="module")
def launched(stack, small_store, small_raw):
    """Start the slow runs at once, so that they overlap: ingest (cpu), two trainings into one registry
    (gpu, one set by `prefect deployment run --param` as an operator would), a submitted scan."""
    new = [new_scan(src, stack.data / "inbox", f"NEW_00{i}") for i, src in enumerate(sources(small_raw)[:2])]
    trained = str(stack.data / "trained")
    runs = {
        "ingest": stack.run(
            "ingest/nightly",
            {
                "raw": [str(stack.data / "raw")],
                "store_url": str(stack.data / "slices.zarr"),
                "data": {"profile": "full"},
            },
        ),
        "train-a": stack.run(
            "train/gpu",
            {"store_url": small_store, "registry_url": trained, "network": TINY_NETWORK, "training": TINY_TRAINING},
        ),
    }
    cli = subprocess.run(
        [
            str(BIN / "prefect"),
            "deployment",
            "run",
            "train/gpu",
            "--param",
            f"store_url={small_store}",
            "--param",
            f"registry_url={trained}",
            "--param",
            f"network={json.dumps(TINY_NETWORK)}",
            "--param",
            f"training={json.dumps({**TINY_TRAINING, 'seed': 1})}",
        ],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    runs["train-b"] = re.search(r"UUID: ([0-9a-f-]{36})", cli.stdout).group(1)
    submit = subprocess.Popen(
        [str(BIN / "brats"), "submit", str(new[0])],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield runs, new, submit
    finally:
        if submit.poll() is None:
            submit.kill()
        submit.communicate()


@pytest.mark.slow
def test_deployments_pools_and_triggers_are_on_the_server(stack):
    flows = {f["id"]: f["name"] for f in stack.post("/flows/filter", {})}
    deployments = {f"{flows[d['flow_id']]}/{d['name']}": d for d in stack.post("/deployments/filter", {})}
    pools = {name: d["work_pool_name"] for name, d in deployments.items()}
    assert pools == {
        "ingest/nightly": "cpu",
        "train/gpu": "gpu",
        "train/cpu": "cpu",
        "evaluate/after-train": "cpu",
        "infer/scans": "cpu",
        "sweep/inbox": "cpu",
        "pipeline/default": "gpu",
        "pipeline/cpu": "cpu",
    }
    for d in deployments.values():
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    # typed sections: the UI renders each as a group of fields, no free JSON
    schema = deployments["pipeline/default"]["parameter_openapi_schema"]
    sections = {name: prop["$ref"].rsplit("/", 1)[-1] for name, prop in schema["properties"].items() if "$ref" in prop}
    assert sections == {
        "data": "Preprocessing",
        "network": "UNetConfig",
        "training": "TrainConfig",
        "prediction": "Prediction",
    }
    assert (
        "epochs" in schema["definitions"]["TrainConfig"]["properties"]
        and "description" in schema["definitions"]["TrainConfig"]["properties"]["epochs"]
    )
    # each pool's recipe (flows/recipes.py); every deployment that ingests with the same data section
    assert {n: d["parameters"].get("recipe") for n, d in deployments.items() if n.startswith(("train", "pipe"))} == {
        "train/gpu": "gpu",
        "train/cpu": "cpu",
        "pipeline/default": "gpu",
        "pipeline/cpu": "cpu",
    }
    data = [d["parameters"]["data"] for n, d in deployments.items() if n.startswith(("ingest", "pipeline"))]
    assert data == [{"profile": "tp", "split_ratios": [0.7, 0.15, 0.15]}] * 3
    assert deployments["ingest/nightly"]["parameters"]["raw"] == [str(stack.data / "raw")]
    assert [s["schedule"].get("cron") for s in deployments["ingest/nightly"]["schedules"]] == ["0 2 * * *"]
    assert [s["schedule"].get("interval") for s in deployments["sweep/inbox"]["schedules"]] == [1800]
    assert deployments["infer/scans"]["global_concurrency_limit"]["limit"] == 1

    assert {p["name"]: p["type"] for p in stack.post("/work_pools/filter", {})}.items() >= {
        "cpu": "process",
        "gpu": "process",
    }.items()
    assert stack.get("/concurrency_limits/tag/gpu")["concurrency_limit"] == 1
    automations = {a["name"]: a for a in stack.post("/automations/filter", {})}
    scan = automations["segment arrived scan"]
    assert scan["trigger"]["expect"] == ["brats.scan.arrived"] and scan["trigger"]["match"] == {
        "prefect.resource.id": "brats.scan.*"
    }
    (action,) = scan["actions"]
    assert action["deployment_id"] == deployments["infer/scans"]["id"]
    assert action["parameters"]["inputs"] == ["{{ event.payload.path }}"]  # rendered by the server per event
    trained = automations["evaluate what was trained"]
    assert (
        trained["trigger"]["expect"] == ["brats.model.trained"]
        and trained["trigger"]["match"]["brats.evaluate"] == "true"
    )
    assert trained["actions"][0]["deployment_id"] == deployments["evaluate/after-train"]["id"]
    assert trained["actions"][0]["parameters"]["version"] == "{{ event.payload.version }}"
    crashed = automations["resume crashed training"]
    assert (
        crashed["trigger"]["expect"] == ["prefect.flow-run.Crashed"]
        and crashed["actions"][0]["deployment_id"] == deployments["train/gpu"]["id"]
    )

    ui = stack.http.get(stack.api.removesuffix("/api") + "/ui-settings").json()
    assert ui["api_url"] == stack.api and ui["auth"] == "BASIC"
    import httpx

    assert httpx.post(f"{stack.api}/deployments/filter", json={}).status_code == 401  # no credentials, no API
    assert httpx.get(f"{stack.api}/health").status_code == 200  # except the health check


@pytest.mark.slow
def test_ingest_deployment_runs_on_the_worker_and_its_artifacts_are_readable(stack, launched):
    runs, _, _ = launched
    run = stack.wait(runs["ingest"])
    assert run["work_pool_name"] == "cpu" and run["parameters"]["data"] == {"profile": "full"}
    artifacts = stack.artifacts(run["id"])
    assert {"ingest-summary", "ingest-cases"} <= set(artifacts) and "ingest-quarantine" not in artifacts  # none refused
    cases = (
        json.loads(artifacts["ingest-cases"]["data"])
        if isinstance(artifacts["ingest-cases"]["data"], str)
        else artifacts["ingest-cases"]["data"]
    )
    assert sorted(r["status"] for r in cases) == ["ingested"] * 6
    assert "| ingested | 6 |" in artifacts["ingest-summary"]["data"]
    tasks = stack.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    done = [t for t in tasks if t["name"].startswith("ingest-") and t["state_type"] == "COMPLETED"]
    assert len(done) == 2  # six cases, one worker thread (BRATS_DASK_WORKERS=1): two batches of 3

    from storage.store import SliceStore

    assert len(SliceStore(str(stack.data / "slices.zarr")).case_ids()) == 6


@pytest.mark.slow
def test_overlapping_trainings_are_each_evaluated_once_and_keep_the_deployments_other_values(
    stack, launched, small_store
):
    """Two trainings into one registry at once; each announces its version as it ends, and the
    triggered evaluation evaluates exactly that version: each once, none of the other run's."""
    runs, _, _ = launched
    finished = [stack.wait(runs[name], timeout=240) for name in ("train-a", "train-b")]
    registry = Registry(str(stack.data / "trained"))
    versions = {v["version"]: v for v in registry.versions()}
    assert len(versions) == 2 and {v["status"] for v in versions.values()} == {"complete"}
    for run in finished:
        assert run["work_pool_name"] == "gpu"
        tasks = stack.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        assert ["gpu" in t["tags"] for t in tasks if t["name"].startswith("train-")] == [True]  # under the "gpu" limit
    for (
        info
    ) in versions.values():  # one field set by the run, every other value the deployment's (not the model's default)
        assert info["model"]["base_channels"] == 4 and (info["model"]["padding"], info["model"]["norm"]) == (
            "same",
            "batch",
        )
        assert info["train_config"]["epochs"] == 1 and info["train_config"]["device"] == "cpu"
        assert (
            info["train_config"]["class_weight_power"],
            info["train_config"]["oversample_tumour"],
            info["train_config"]["batch_size"],
        ) == (0.5, 3.0, 4)
    assert sorted(v["train_config"]["seed"] for v in versions.values()) == [0, 1]

    evaluations = stack.until(
        "two evaluation runs", lambda: (e := stack.runs_of("evaluate/after-train")) and len(e) >= 2 and e
    )
    evaluations = [stack.wait(e["id"]) for e in evaluations]
    time.sleep(3)
    assert len(stack.runs_of("evaluate/after-train")) == 2
    assert sorted(e["parameters"]["version"] for e in evaluations) == sorted(
        versions
    )  # exactly those versions, once each
    assert {e["parameters"]["store_url"] for e in evaluations} == {small_store} and {
        e["parameters"]["split"] for e in evaluations
    } == {"test"}
    for version in versions:
        assert registry.info(version)["evaluation"]["split"] == "test"


@pytest.mark.slow
def test_a_training_whose_process_is_killed_is_resumed_and_ends_as_if_never_stopped(stack, small_store):
    from unet.checkpoint import from_bytes

    models = str(stack.data / "crash")
    training = {**TINY_TRAINING, "epochs": 8, "max_steps_per_epoch": 20, "checkpoint_every": 5, "precision": "fp32"}
    first = stack.run(
        "train/gpu", {"store_url": small_store, "registry_url": models, "network": TINY_NETWORK, "training": training}
    )
    registry = Registry(models)

    def checkpointed():
        versions = registry.versions()
        return (
            versions
            and registry.exists(versions[0]["version"], "checkpoint.pt")
            and (versions[0].get("epochs_done") or 0) >= 1
            and versions[0]
        )

    version = stack.until("a checkpoint after the first epoch", checkpointed, timeout=240)["version"]
    pid = stack.until("the flow run's process", lambda: flow_run_process(first))
    os.kill(pid, signal.SIGKILL)
    crashed = stack.until(
        "a crashed run",
        lambda: (r := stack.get(f"/flow_runs/{first}"))["state"]["type"] == "CRASHED" and r,
        timeout=120,
    )
    assert crashed["state"]["type"] == "CRASHED"

    resumed = stack.until(
        "the resumed run",
        lambda: [
            r for r in stack.runs_of("train/gpu") if r["id"] != first and r["parameters"]["registry_url"] == models
        ],
    )
    run = stack.wait(resumed[0]["id"], timeout=240)
    assert run["parameters"]["training"] == crashed["parameters"]["training"]  # the same run again
    assert [v["version"] for v in registry.versions()] == [version]  # the same version, continued
    info = registry.info(version)
    assert (info["status"], info["epochs_done"], info["attempts"]) == ("complete", training["epochs"], 2)
    artifacts = stack.artifacts(run["id"])
    assert "resumed at epoch" in artifacts["train-summary"]["data"]

    # the same training, never stopped, on the same worker: the same weights
    reference = str(stack.data / "uninterrupted")
    stack.wait(
        stack.run(
            "train/gpu",
            {"store_url": small_store, "registry_url": reference, "network": TINY_NETWORK, "training": training},
        ),
        timeout=240,
    )
    (other,) = Registry(reference).versions()
    resumed_weights, reference_weights = (
        from_bytes(Registry(root).get(v, "weights.pt"))
        for root, v in ((models, version), (reference, other["version"]))
    )
    assert resumed_weights.keys() == reference_weights.keys()
    assert all(torch.equal(resumed_weights[k], reference_weights[k]) for k in resumed_weights)


@pytest.mark.slow
def test_a_submitted_scan_is_segmented_by_the_triggered_run_and_the_sweep_does_the_rest(stack, launched):
    _, new, submit = launched
    stdout, stderr = submit.communicate(timeout=180)
    assert submit.returncode == 0, stderr
    assert f"emitted brats.scan.arrived NEW_000 {new[0]}" in stdout
    out = stack.data / "segmentations"
    (run,) = stack.until("inference run", lambda: stack.runs_of("infer/scans"))
    run = stack.wait(run["id"])
    assert run["parameters"]["inputs"] == [str(new[0])]  # from the event's payload
    assert run["parameters"]["out"] == str(out)  # the trigger set inputs and naming only: the rest is the deployment's
    done = json.loads((out / "NEW_000.json").read_text())
    assert done["inputs"]["flair"] == str(new[0] / "NEW_000_flair.nii.gz")
    assert (out / "NEW_000_seg.nii.gz").is_file() and not (out / "NEW_001.json").exists()
    stamp = (out / "NEW_000_seg.nii.gz").stat().st_mtime_ns
    assert (
        json.loads((stack.data / "inbox" / STATE_NAME).read_text())["emitted"]["NEW_000"]["by"] == "submit"
    )  # the watcher will not announce it again

    swept = stack.wait(
        stack.run(
            "sweep/inbox",
            {
                "inbox": [str(stack.data / "inbox")],
                "out": str(out),
                "registry_url": str(stack.data / "models"),
                "settle_s": 0,
                "grace_s": 0,
            },
        )
    )
    table = stack.artifacts(swept["id"])["sweep-cases"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert {r["case"]: r["status"] for r in table} == {"NEW_000": "done", "NEW_001": "pending"}
    assert (out / "NEW_001_seg.nii.gz").is_file()
    assert (out / "NEW_000_seg.nii.gz").stat().st_mtime_ns == stamp  # not segmented twice
    assert len(stack.runs_of("infer/scans")) == 1
