"""A burst, a restart, nothing lost: N scans dropped into a watched inbox at once.

    python benchmarks/burst.py [--scans 100] [--case DIR] [--models M --model V]

What an operator runs on one machine, as real processes: a ``prefect server start`` (its own home),
two ``brats serve`` processes (the warm model) and ``brats watch INBOX --served``. N scans are
copied into the inbox at once, alternately copies of a real case (``--case``) and of synthetic
cases. The first time both are segmenting, one ``brats serve`` is killed (SIGKILL) and another
started; when half the scans are written the server is stopped and started again (same port, same
database). Any ``brats serve`` that leaves on its own is started again, as a service manager would.

The watcher retries what it could not send while the server was away. What the restart and the kill
took with them is what the scheduled sweep is for: the scan being segmented by the killed process,
and the task runs still queued in the server (Prefect 3.9 queues background task runs in the
server's memory; a restart forgets them, and they stay Scheduled): once nothing new has been written
for ``--quiet`` seconds, ``brats sweep INBOX --grace 0`` segments what is missing, as
``sweep/inbox`` does every 30 minutes on a server.

Checked at the end: every scan has its segmentation (readable, its scan's shape) and its record,
none was written twice (file events on the output folder: one record written per case), no partial
file is left. Prints the time to drain and the last file -> segmentation times (p50, p95).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.prefect_server import Postgres, prefect_server, program  # noqa: E402
from benchmarks.prefect_server import stop as stop_all  # noqa: E402
from benchmarks.scan_to_seg import new_scan, untrained  # noqa: E402


def synthetic_cases(folder: Path, n: int) -> list[Path]:
    from storage.synth import write_dataset

    write_dataset(folder, cases=n, seed=3)
    return sorted(p for p in folder.rglob("*") if p.is_dir() and any(p.glob("*_flair.nii.gz")))


def records_written(out: Path, stop: threading.Event, counts: Counter) -> None:
    """Count each ``<case>.json`` record written into ``out`` (an atomic rename: one 'added' event)."""
    import watchfiles

    for changes in watchfiles.watch(out, debounce=20, step=5, stop_event=stop, yield_on_timeout=True):
        for change, path in changes:
            name = Path(path).name
            if change == watchfiles.Change.added and name.endswith(".json") and not name.startswith("."):
                counts[name[: -len(".json")]] += 1


def running_scans(api: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    running = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=["RUNNING"])))
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return sum(r.name.startswith("segment-") for r in client.read_task_runs(task_run_filter=running))


def burst(
    scans: int,
    work: Path,
    case: Path,
    models: Path | None = None,
    version: str | None = None,
    quiet: float = 20.0,
    timeout: float = 3600.0,
    say=print,
    database: str = "sqlite",
) -> dict:
    """Run the burst in ``work``; a report of what happened and what was found at the end.
    ``database``: the server's, ``sqlite`` (its home's) or ``postgres`` (a throwaway cluster)."""
    if models is None:
        models = work / "models"
        version = untrained(models, base_channels=16)
    inbox, out, home = work / "inbox", work / "out", work / "prefect"
    inbox.mkdir(parents=True)
    out.mkdir()
    log = open(work / "processes.log", "w")
    pg = Postgres(log) if database == "postgres" else None
    db_url = pg.url if pg else None
    server, api = prefect_server(home, log, database=db_url)
    port = urlsplit(api).port
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    brats = [program("brats")]
    serve_cmd = (
        brats + ["serve", "--out", str(out), "--registry", str(models)] + (["--version", version] if version else [])
    )

    def start_serve() -> subprocess.Popen:
        p = subprocess.Popen(serve_cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        ready = p.stdout.readline()
        if "serving" not in ready:
            raise RuntimeError(f"brats serve did not start: {ready!r} (see {work / 'processes.log'})")
        return p

    counts: Counter = Counter()
    stop = threading.Event()
    watching = threading.Thread(target=records_written, args=(out, stop, counts), daemon=True)
    watching.start()
    servers, watcher = [], None
    report: dict = {"scans": scans, "restarted_server": False, "killed_while_segmenting": False, "serve_restarts": 0}
    try:
        servers = [start_serve(), start_serve()]
        watcher = subprocess.Popen(brats + ["watch", str(inbox), "--served"], env=env, stdout=log, stderr=log)
        time.sleep(3.0)  # subscribed, and the watcher is up
        sources = [case] + synthetic_cases(work / "synthetic", 3)
        dropped: dict[str, float] = {}
        started = time.perf_counter()
        for i in range(scans):
            src = sources[0] if i % 2 == 0 else sources[1 + (i // 2) % (len(sources) - 1)]
            folder = new_scan(src, inbox, f"BURST_{i:03d}")
            dropped[folder.name] = time.time()
        say(f"{scans} scans dropped in {time.perf_counter() - started:.1f} s")

        def done() -> int:
            return sum((out / f"{c}.json").exists() for c in dropped)

        swept, last_change, last_done = False, time.perf_counter(), 0
        while (n := done()) < scans:
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"only {n} of {scans} written after {timeout:.0f} s")
            if n != last_done:
                last_done, last_change = n, time.perf_counter()
            if not report["killed_while_segmenting"] and running_scans(api) >= 2:
                say(f"{n} written: killing a brats serve while both are segmenting")
                servers[0].send_signal(signal.SIGKILL)
                servers[0].wait()
                servers[0] = start_serve()
                report["killed_while_segmenting"] = True
            if not report["restarted_server"] and n >= scans // 2:
                say(f"{n} written: stopping the server")
                stop_all(server, timeout=60)
                time.sleep(2.0)
                down = time.perf_counter()
                server, _ = prefect_server(home, log, port=port, database=db_url)
                report["restarted_server"] = True
                report["restart_s"] = round(time.perf_counter() - down, 1)
                say(f"server back after {time.perf_counter() - started:.1f} s ({report['restart_s']} s to answer)")
            for i, p in enumerate(servers):
                if p.poll() is not None:  # left on its own (e.g. the server went away): started again
                    servers[i] = start_serve()
                    report["serve_restarts"] += 1
            if not swept and report["restarted_server"] and time.perf_counter() - last_change > quiet:
                say(f"{n} written, nothing new for {quiet:.0f} s: the sweep")
                subprocess.run(
                    brats
                    + [
                        "sweep",
                        str(inbox),
                        "--out",
                        str(out),
                        "--registry",
                        str(models),
                        "--grace-s",
                        "0",
                        "--settle-s",
                        "0",
                    ],
                    env=env,
                    stdout=log,
                    stderr=log,
                )
                swept = True
            time.sleep(0.5)
        report["drain_s"] = round(time.perf_counter() - started, 1)
        report["swept"] = swept
        time.sleep(1.0)  # the last file events
    finally:
        stop.set()
        stop_all(watcher, *servers, server)
        if pg is not None:
            pg.stop()
        log.close()
    latency = sorted((out / f"{c}.json").stat().st_mtime - t for c, t in dropped.items())
    report["p50_s"] = round(statistics.median(latency), 1)
    report["p95_s"] = round(latency[int(0.95 * (len(latency) - 1))], 1)
    report["missing"] = [c for c in dropped if not (out / f"{c}_seg.nii.gz").is_file()]
    report["written_twice"] = sorted(c for c, k in counts.items() if k > 1)
    report["not_seen_written"] = sorted(c for c in dropped if counts[c] == 0)
    report["partial_files"] = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    report["bad_segmentations"] = [c for c in dropped if not _readable(out, c, inbox)]
    return report


def _readable(out: Path, case_id: str, inbox: Path) -> bool:
    import nibabel as nib

    try:
        seg = nib.load(out / f"{case_id}_seg.nii.gz")
        scan = nib.load(next((inbox / case_id).glob("*_flair.nii.gz")))
        record = json.loads((out / f"{case_id}.json").read_text())
        return seg.shape == scan.shape and seg.get_fdata().max() <= 4 and record["case"] == case_id
    except (OSError, ValueError, StopIteration, KeyError):
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", type=int, default=100)
    ap.add_argument(
        "--case", type=Path, default=ROOT / "tests" / "data" / "Brats18_2013_2_1", help="a real case folder"
    )
    ap.add_argument("--models", type=Path, help="model registry (default: an untrained tp model)")
    ap.add_argument("--model", default=None, help="version in --models (default: its best)")
    ap.add_argument("--quiet", type=float, default=20.0, help="seconds without a new segmentation before the sweep")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--db",
        choices=("sqlite", "postgres", "both"),
        default="sqlite",
        help="the server's database (both: one after the other)",
    )
    args = ap.parse_args()
    ok_all, lines = True, []
    for database in ("sqlite", "postgres") if args.db == "both" else (args.db,):
        work = Path(tempfile.mkdtemp(prefix=f"brats-burst-{database}-"))
        try:
            report = burst(args.scans, work, args.case, args.models, args.model, args.quiet, database=database)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        print(json.dumps({"database": database, **report}, indent=2))
        ok = not (
            report["missing"] or report["written_twice"] or report["partial_files"] or report["bad_segmentations"]
        )
        ok_all &= ok
        lines.append(
            f"{database:9}{args.scans} scans: drained in {report['drain_s']} s; "
            f"server restart {report.get('restart_s')} s; "
            f"last file -> segmentation p50 {report['p50_s']} s, p95 {report['p95_s']} s; "
            f"{'nothing lost, none written twice' if ok else 'FAILED'}"
        )
    print("\n" + "\n".join(lines))
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
