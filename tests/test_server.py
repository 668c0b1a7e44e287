"""The whole thing on a real Prefect server (``tests/stack.py``: the server, bootstrap.sh, a process
worker per pool). For real: the ingest deployment runs on the cpu worker and its artifacts are read
through the REST API; two trainings overlap in the gpu pool (one started by `prefect deployment run
--param` with one field of a section, the deployment's others kept) and each version they announce
is evaluated once; a training whose process is killed is started again by its automation and ends
with the weights of an uninterrupted run; ``brats submit`` emits ``brats.scan.arrived`` and the
triggered inference run writes the segmentation; the sweep deployment segments the scan left over
and leaves the done one alone.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from flows.recipes import recipe
from storage.inbox import STATE_NAME
from storage.registry import Registry
from tests.helpers import alive, case_folders, new_scan, stop
from tests.stack import BIN, ROOT, running_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory, small_raw):
    """Server + bootstrap.sh (pools, concurrency limit, deployments) + one process worker per pool."""
    with running_stack(tmp_path_factory.mktemp("server"), small_raw) as running:
        yield running


TINY_NETWORK = {"base_channels": 4, "depth": 2, "context": 0, "deep_supervision": False}  # padding, norm kept
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
    new = [new_scan(src, stack.data / "inbox", f"NEW_00{i}") for i, src in enumerate(case_folders(small_raw)[:2])]
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
        "review/list": "cpu",
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
    assert [(d["profile"], d["split_ratios"]) for d in data] == [("tp-clip", [0.7, 0.15, 0.15])] * 3
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
    flagged = automations["list flagged segmentation"]
    assert flagged["trigger"]["expect"] == ["brats.segmentation.review"]
    assert flagged["actions"][0]["deployment_id"] == deployments["review/list"]["id"]
    assert automations["resume crashed cpu training"]["actions"][0]["deployment_id"] == deployments["train/cpu"]["id"]
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
def test_a_run_submitted_from_the_ui_form_unchanged_runs_the_recipe(stack, tmp_path):
    """The UI's form shows a deployment's parameters over the schema's defaults and submits every field.
    Submitted so (only the store changed, to one that does not exist, so the run stops right after
    saying what it would train), train/cpu uses exactly the cpu recipe's network and training."""
    deployment = stack.deployment("train/cpu")
    schema = deployment["parameter_openapi_schema"]["properties"]
    form = {name: deployment["parameters"].get(name, prop.get("default")) for name, prop in schema.items()}
    assert form["training"]["folds"] == recipe("cpu").training.folds  # the form shows the recipe, not 0
    form["store_url"] = str(tmp_path / "absent.zarr")
    run = stack.run("train/cpu", form)
    ended = stack.until(
        "the end of the form's run",
        lambda: (
            (r := stack.get(f"/flow_runs/{run}"))["state_type"] in ("FAILED", "COMPLETED", "CRASHED") and r["state"]
        ),
    )
    assert ended["type"] == "FAILED" and "absent.zarr: no slice store here" in ended["message"], ended
    logs = stack.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [run]}}})
    (line,) = [log["message"] for log in logs if log["message"].startswith("sections used: ")]
    used = ast.literal_eval(line.removeprefix("sections used: "))
    cpu = recipe("cpu")
    assert used == {"network": cpu.network.model_dump(), "training": cpu.training.model_dump()}


@pytest.mark.slow
def test_cpu_folds_run_side_by_side_on_the_cpu_pool(stack, small_store, tmp_path):
    """train/cpu with 2 folds starts each fold as a run of train/cpu; with no gpu tag on CPU training
    one cpu worker runs both at once, and the parent registers their ensemble when both are done:
    the fold versions its runs trained, each with the augmentation of its turn."""
    models = str(tmp_path / "models")
    training = {**TINY_TRAINING, "folds": 2}
    parent = stack.wait(
        stack.run(
            "train/cpu",
            {"store_url": small_store, "registry_url": models, "network": TINY_NETWORK, "training": training},
        ),
        timeout=400,
    )
    folds = [
        r
        for r in stack.runs_of("train/cpu")
        if r["parameters"].get("registry_url") == models and r["id"] != parent["id"]
    ]
    assert sorted(r["parameters"]["fold"] for r in folds) == [0, 1] and all(
        r["state_type"] == "COMPLETED" for r in folds
    )
    (a, b) = sorted(folds, key=lambda r: r["start_time"])
    assert b["start_time"] < a["end_time"]  # side by side, not one after the other
    tasks = stack.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [r["id"] for r in folds]}}})
    assert not [t["name"] for t in tasks if "gpu" in t["tags"]]
    ensemble = [v for v in Registry(models).versions() if v.get("kind") == "ensemble"]
    assert len(ensemble) == 1 and len(ensemble[0]["members"]) == 2
    # the recipe's members take turns at the augmentation, each fold run its own
    assert [Registry(models).info(m)["train_config"]["augment"] for m in ensemble[0]["members"]] == ["strong", "gin"]


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
        # trained on the CPU (training.device cpu): not under the "gpu" limit, which is for GPU training only
        assert ["gpu" in t["tags"] for t in tasks if t["name"].startswith("train-")] == [False]
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

    def of_these():  # the evaluations of this registry (other tests' trainings are announced too)
        return [e for e in stack.runs_of("evaluate/after-train") if e["parameters"].get("registry_url") == str(trained)]

    trained = stack.data / "trained"
    evaluations = stack.until("two evaluation runs", lambda: (e := of_these()) and len(e) >= 2 and e)
    evaluations = [stack.wait(e["id"]) for e in evaluations]
    time.sleep(3)
    assert len(of_these()) == 2
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
    assert {r["case"]: (r["sweep"], r["status"], r["best"]) for r in table} == {
        "NEW_000": ("done", "segmented", True),
        "NEW_001": ("pending", "segmented", True),  # what the sweep did, and where the scan stands now
    }
    assert (out / "NEW_001_seg.nii.gz").is_file()
    assert (out / "NEW_000_seg.nii.gz").stat().st_mtime_ns == stamp  # not segmented twice
    assert len(stack.runs_of("infer/scans")) == 1


def test_a_stopped_worker_finishes_its_run_and_takes_no_new_one_and_stopped_twice_hands_it_back(stack, small_store):
    """``brats worker`` as the README stops it: SIGTERM once, its flow run completes, no new run is
    taken, and it leaves; SIGTERM twice, its run is cancelled (its process ends) and scheduled again."""
    d = stack.deployment("train/gpu")
    stack.post("/work_pools/", {"name": "drain", "type": "process"})
    copied = ("flow_id", "entrypoint", "path", "pull_steps", "parameters", "parameter_openapi_schema")
    stack.post("/deployments/", {**{k: d[k] for k in copied}, "name": "drain", "work_pool_name": "drain"})
    training = {**TINY_TRAINING, "epochs": 4, "max_steps_per_epoch": 20, "precision": "fp32"}
    params = {"store_url": small_store, "network": TINY_NETWORK, "training": training}
    log = open(stack.logs / "worker-drain.log", "ab")

    def worker() -> subprocess.Popen:
        command = [str(BIN / "brats"), "worker", "--pool", "drain", "--name", "drain-1"]
        return subprocess.Popen(command, env=stack.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def running(run_id: str) -> bool:
        return stack.get(f"/flow_runs/{run_id}")["state"]["type"] == "RUNNING"

    first_worker = worker()
    try:
        first = stack.run("train/drain", {**params, "registry_url": str(stack.data / "drain-1")})
        stack.until("the first run under way", lambda: running(first), timeout=120)
        first_worker.send_signal(signal.SIGTERM)
        second = stack.run("train/drain", {**params, "registry_url": str(stack.data / "drain-2")})
        assert stack.wait(first, timeout=240)["state"]["type"] == "COMPLETED"
        assert first_worker.wait(timeout=60) == 0
        assert stack.get(f"/flow_runs/{second}")["state"]["type"] == "SCHEDULED"  # not taken by a stopping worker
    finally:
        stop([first_worker])

    second_worker = worker()
    try:
        stack.until("the second run under way", lambda: running(second), timeout=120)
        pid = stack.until("its process", lambda: flow_run_process(second))
        second_worker.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        second_worker.send_signal(signal.SIGTERM)
        assert second_worker.wait(timeout=120) == 0
        assert stack.get(f"/flow_runs/{second}")["state"]["type"] == "SCHEDULED"  # handed back to the pool
        assert not alive(pid)
    finally:
        stop([second_worker])
        stack.post(f"/flow_runs/{second}/set_state", {"state": {"type": "CANCELLED"}, "force": True})
    assert b"no new flow run taken" in (stack.logs / "worker-drain.log").read_bytes()
