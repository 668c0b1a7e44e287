"""Scan-to-segmentation benchmark: seconds from a new scan to ``<case>_seg.nii.gz`` on disk.

    python benchmarks/scan_to_seg.py --case DIR [--models M --model V] [--repeats 5]

What an operator runs, on this machine: a real ``prefect server start`` (temporary home), then, once
and before the clock, ``brats serve --out OUT`` (a task worker with the model loaded and run once).
Each repeat copies the case under a new id into an inbox (a new scan, nothing cached on disk) and
times ``brats submit <folder> --served`` (a new process: start-up included) until the segmentation
and its record are written. Then the hands-off path: ``brats watch INBOX --served`` running, each
repeat copies a case's four files into the watched inbox as a scanner would, and the clock runs from
the last file written to the record (the watcher's settle time included). For comparison, the cold
path a deployment's flow run takes: ``brats infer <folder>`` as a new process (imports, model load,
prediction, write), timed the same way. With ``--event N``, also the event path of "Deploy":
``deploy/bootstrap.sh`` against the server (pools, deployments, triggers), the model copied into
``$BRATS_STORAGE/models``, one ``brats worker --pool cpu`` (``--no-warm`` first, then ``--warm``);
each repeat ``brats submit <folder>`` (no ``--served``: the ``brats.scan.arrived`` event -> the
``infer/scans`` deployment's trigger -> a flow run on the worker: a new process, or one forked from
its warm process) until the record is in ``$BRATS_DATA/segmentations``.

The model: ``--models``/``--model`` (e.g. a trained ``tp`` version), else an untrained ``tp`` U-Net
of ``--base`` channels (the cost does not depend on the weights). Prints each time and the medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.prefect_server import prefect_server, program, stop  # noqa: E402


def untrained(models: Path, **network) -> str:
    """An untrained U-Net (``UNetConfig(**network)``, seed 0, profile tp) as the best version of
    ``models``: the cost of a prediction does not depend on the weights."""
    import torch

    from storage.registry import Registry
    from unet.checkpoint import save_model
    from unet.model import UNet, UNetConfig

    registry = Registry(str(models))
    version = registry.create({"profile": "tp", "status": "complete"})
    torch.manual_seed(0)
    save_model(registry, version, UNet(UNetConfig(**network)))
    registry.set_best(version)
    return version


def new_scan(case: Path, inbox: Path, new_id: str) -> Path:
    folder = inbox / new_id
    folder.mkdir(parents=True)
    for f in case.iterdir():
        if f.name.endswith((".nii.gz", ".nii")) and not f.name.split(".")[0].endswith("_seg"):
            shutil.copy(f, folder / f.name.replace(case.name, new_id, 1))
    return folder


def until_written(out: Path, case_id: str, start: float, timeout: float = 300) -> float:
    record = out / f"{case_id}.json"  # written last, after the segmentation
    while not record.exists():
        if time.perf_counter() - start > timeout:
            raise SystemExit(f"no {record} after {timeout:.0f} s")
        time.sleep(0.02)
    return time.perf_counter() - start


def event_path(case: Path, models: Path, version: str | None, repeats: int, tmp: Path, env: dict, log, procs) -> dict:
    """Seconds from ``brats submit`` to the record, through the deployed trigger and a process worker:
    ``{"cold": [...], "warm": [...]}``, the worker started with ``--no-warm`` (a new Python process per
    flow run, as Prefect's own worker) and then with ``--warm`` (forked from a warm one), one after the other."""
    data = tmp / "data"
    deployed = {
        **env,
        "BRATS_DATA": str(data),
        "BRATS_STORAGE": str(data),
        "PATH": f"{Path(program('brats')).parent}:{env['PATH']}",
    }
    subprocess.run(["sh", str(ROOT / "deploy" / "bootstrap.sh")], env=deployed, check=True, stdout=log, stderr=log)
    shutil.copytree(models, data / "models", dirs_exist_ok=True)
    if version:
        from storage.registry import Registry

        Registry(str(data / "models")).set_best(version)
    times: dict[str, list] = {}
    for mode in ("cold", "warm"):
        command = [program("brats"), "worker", "--pool", "cpu", "--warm" if mode == "warm" else "--no-warm"]
        worker = subprocess.Popen(command, env=deployed, stdout=log, stderr=log)
        time.sleep(8.0)  # the worker's start-up (and its warm process's imports) is not a scan's wait
        times[mode] = []
        for r in range(repeats):
            folder = new_scan(case, data / "inbox", f"{case.name}_{mode}{r}")
            began, start = time.time(), time.perf_counter()
            subprocess.run([program("brats"), "submit", str(folder)], env=deployed, check=True, capture_output=True)
            submitted = time.perf_counter() - start
            times[mode].append(until_written(data / "segmentations", folder.name, start))
            spent = where(env, folder.name, began, submitted)
            print(f"event ({mode} worker) {r + 1}: written {times[mode][-1]:.1f} s after `brats submit`; {spent}")
        worker.send_signal(signal.SIGTERM)  # it leaves once idle
        worker.wait(timeout=60)
    return times


def where(env: dict, case_id: str, began: float, submitted: float) -> str:
    """Where an event-path scan's seconds went, from its flow run's times on the server."""
    from datetime import datetime

    import httpx

    query = {"flow_runs": {"name": {"any_": [f"infer-{case_id}"]}}}
    for _ in range(300):  # the record is written before the run reports its end
        runs = httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", json=query, timeout=30).json()
        if runs and runs[0]["end_time"]:
            break
        time.sleep(0.1)
    else:
        return "its flow run not found, or not ended"
    t = {k: datetime.fromisoformat(runs[0][k]).timestamp() for k in ("created", "start_time", "end_time")}
    states = httpx.get(f"{env['PREFECT_API_URL']}/flow_run_states/", params={"flow_run_id": runs[0]["id"]}).json()
    pending = min(datetime.fromisoformat(s["timestamp"]).timestamp() for s in states if s["type"] == "PENDING")
    return (
        f"brats submit {submitted:.1f} s, event -> run created {t['created'] - began - submitted:.1f} s, "
        f"created -> pending (the worker's poll) {pending - t['created']:.1f} s, "
        f"pending -> running (the run's process: Prefect, the flow's imports) {t['start_time'] - pending:.1f} s, "
        f"running -> done (model, prediction, files) {t['end_time'] - t['start_time']:.1f} s"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", type=Path, default=ROOT / "tests" / "data" / "Brats18_2013_2_1", help="a case folder")
    ap.add_argument("--models", type=Path, help="model registry (default: an untrained tp model)")
    ap.add_argument("--model", default=None, help="version in --models (default: its best)")
    ap.add_argument("--base", type=int, default=16, help="base channels of the untrained model")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cold", type=int, default=2, help="cold `brats infer` runs for comparison (0: none)")
    ap.add_argument("--event", type=int, default=0, help="scans through the deployed event path (0: none)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="brats-scan2seg-"))
    models = args.models or tmp / "models"
    version = args.model or (None if args.models else untrained(models, base_channels=args.base))
    log = open(tmp / "server.log", "w")
    server, api = prefect_server(tmp / "prefect", log)
    procs = [server]
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": api,
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    out, inbox = tmp / "out", tmp / "inbox"
    try:
        serve = [program("brats"), "serve", "--out", str(out), "--models", str(models)] + (
            ["--model", version] if version else []
        )
        procs.append(subprocess.Popen(serve, env=env, stdout=subprocess.PIPE, stderr=log, text=True))
        ready = procs[-1].stdout.readline()
        if "serving" not in ready:
            raise SystemExit(f"brats serve did not start: {ready!r} (see {tmp / 'server.log'})")
        print(ready.strip())
        time.sleep(1.0)  # the worker subscribes right after it says so
        served, submit_only, watched, cold = [], [], [], []
        for r in range(args.repeats):
            folder = new_scan(args.case, inbox, f"{args.case.name}_s{r}")
            start = time.perf_counter()
            submit = [program("brats"), "submit", str(folder), "--served"]
            subprocess.run(submit, env=env, check=True, capture_output=True)
            submit_only.append(time.perf_counter() - start)
            served.append(until_written(out, folder.name, start))
            print(f"served {r + 1}: submit {submit_only[-1]:.1f} s, segmentation written after {served[-1]:.1f} s")
        watched_inbox = tmp / "watched"
        watched_inbox.mkdir()
        watch = [program("brats"), "watch", str(watched_inbox), "--served"]
        procs.append(subprocess.Popen(watch, env=env, stdout=log, stderr=log))
        time.sleep(3.0)  # the watcher's start-up (imports) is not a scan's wait
        for r in range(args.repeats):
            folder = new_scan(args.case, watched_inbox, f"{args.case.name}_w{r}")
            start = time.perf_counter()  # the last file is written
            watched.append(until_written(out, folder.name, start))
            print(f"watched {r + 1}: segmentation written {watched[-1]:.1f} s after the last file")
        for r in range(args.cold):
            folder = new_scan(args.case, inbox, f"{args.case.name}_c{r}")
            start = time.perf_counter()
            infer = [program("brats"), "infer", str(folder), "--out", str(out), "--models", str(models)]
            subprocess.run(infer + (["--model", version] if version else []), env=env, check=True, capture_output=True)
            cold.append(until_written(out, folder.name, start))
            print(f"cold `brats infer` {r + 1}: {cold[-1]:.1f} s")
        event = event_path(args.case, models, version, args.event, tmp, env, log, procs) if args.event else {}
    finally:
        stop(*reversed(procs))
        log.close()
    print(f"\ncase {args.case.name}, model {version or 'best'} of {models}")
    median = statistics.median(served)
    print(f"  served (brats serve, warm): submit -> segmentation  median {median:5.1f} s  (target <= 10)")
    print(f"    of which `brats submit` itself                     median {statistics.median(submit_only):5.1f} s")
    print(f"  watched (brats watch --served): last file -> segmentation  median {statistics.median(watched):5.1f} s")
    if cold:
        print(f"  cold (`brats infer`, a new process)                 median {statistics.median(cold):5.1f} s")
    for mode, times in event.items():
        print(f"  event, {mode} worker (brats submit -> trigger -> run) median {statistics.median(times):5.1f} s")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
