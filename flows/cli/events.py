"""New scans announce themselves: ``brats watch`` and ``brats submit`` emit ``brats.scan.arrived``.

    brats watch INBOX     watch INBOX (file-system events, ``watchfiles``; ``--polling`` on network
                          file systems); a case whose four modalities are all there and whose file
                          sizes and mtimes stayed the same for ``--settle`` seconds is complete: emit
                          one event for it and note it in INBOX/.brats-watch.json (``storage.inbox``)
    brats submit PATH     emit the same event by hand for a case folder (or every case under a root),
                          noted there too, so the watcher does not announce it again

With ``--served`` both send each scan straight to the ``brats serve`` processes instead
(``segment-scan`` task runs, a model kept warm: seconds from scan to segmentation; ``flows/cli/served.py``).

The ``infer/scans`` deployment has a trigger on the event whose parameters come from its payload
(``path``, ``naming``; deploy/prefect.yaml); the ``sweep`` flow (``flows/sweep.py``) does whatever
was missed. Paths in the event are absolute: the inbox must be mounted at the same path on the
watcher and on the workers that run inference.

Both commands need a Prefect server (``PREFECT_API_URL``): events sent to a temporary API trigger
nothing, so without one they refuse at once.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from storage.brats import MODALITIES
from storage.cases import Naming
from storage.inbox import Scan, Watcher, record, scans_at, state_path

EVENT = "brats.scan.arrived"
RESOURCE_PREFIX = "brats.scan."


def scan_event(scan: Scan, source: str, naming: str = "auto"):
    from prefect.events import Event

    return Event(
        event=EVENT,
        resource={
            "prefect.resource.id": RESOURCE_PREFIX + scan.case.case_id,
            "prefect.resource.name": scan.case.case_id,
        },
        payload={
            "path": scan.path,
            "case": scan.case.case_id,
            "naming": naming,
            "files": {c: scan.case.files[c] for c in MODALITIES},
            "source": source,
            "host": socket.gethostname(),
        },
    )


def send(events: list) -> None:
    """Deliver events to the configured Prefect API now (not through a background buffer)."""
    from prefect.events.clients import get_events_client

    async def _send():
        async with get_events_client(reconnection_attempts=3) as client:
            for event in events:
                await client.emit(event)

    if events:
        asyncio.run(_send())


def deliver(scans: list[Scan], source: str, naming: str = "auto", served: bool = False) -> None:
    """Announce scans (``brats.scan.arrived``: the ``infer/scans`` deployment), or, ``served``, send
    each straight to the ``brats serve`` processes (``segment-scan``, ``flows/cli/served.py``)."""
    if not served:
        send([scan_event(s, source, naming) for s in scans])
        return
    from tasks.served import segment_scan

    for s in scans:  # tagged with its case: the UI's task runs filter by it
        segment_scan.with_options(tags=["served", f"case:{s.case.case_id}"]).delay(s.path, s.case.case_id, naming)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def watch(
    inbox: str,
    settle: float = 1.0,
    interval: float = 30.0,
    state: str | None = None,
    naming: Naming = "auto",
    max_polls: int = 0,
    baseline: bool = False,
    served: bool = False,
    polling: bool = False,
) -> int:
    """Watch an inbox; emit brats.scan.arrived for each complete new scan, as soon as it settles.

    Args:
        inbox: inbox folder: <case>/ or {HGG,LGG}/<case>/
        settle: seconds a scan's files must stay unchanged (all four modalities there) before it is announced
        interval: seconds between looks at the whole inbox when no file event comes (a safety net)
        state: state file (default: INBOX/.brats-watch.json)
        naming: file names: auto (per case), brats2019 (flair/t1/t1ce/t2) or brats2023 (t2f/t1n/t1c/t2w)
        max_polls: stop after N looks (0: run until stopped, by Ctrl-C or one SIGTERM)
        baseline: record the scans already there as announced, without emitting (the sweep does them)
        served: send each scan to the `brats serve` processes (a warm model, seconds) instead of emitting the event
        polling: poll the file system for changes instead of its change events (network file systems)
    """
    import watchfiles

    watcher = Watcher(inbox, lambda scans: deliver(scans, "watch", naming, served), state, naming)
    if baseline:
        print(f"{_now()} baseline: {watcher.baseline()} scan(s) recorded in {watcher.state}", flush=True)
    how = "polling its files" if polling else "file events"
    print(f"{_now()} watching {watcher.inbox} ({how}; settled after {settle:g}s; state {watcher.state})", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    state = str(watcher.state)
    changes = watchfiles.watch(
        watcher.inbox,
        # hidden names are never scans: among them the state file (.brats-watch.json) and its
        # temporary copy, written here after each announcement (rsync-style renames end visible)
        watch_filter=lambda change, path: path != state and not Path(path).name.startswith("."),
        debounce=100,
        rust_timeout=max(50, int(settle * 1000)),
        yield_on_timeout=True,  # quiet for `settle` seconds: time for another look at unsettled scans
        force_polling=polling,
        ignore_permission_denied=True,
    )
    polls, last = 0, 0.0
    try:
        for changed in itertools.chain([set()], changes):
            if not (changed or watcher.unsettled or time.monotonic() - last >= interval):
                continue
            last = time.monotonic()
            try:
                for s in watcher.poll():
                    sent = "sent segment-scan" if served else f"emitted {EVENT}"
                    print(f"{_now()} {sent} {s.case.case_id} {s.path}", flush=True)
                for w in watcher.new_waiting:  # incomplete or refused: said once, with the reason
                    print(f"{_now()} not a complete scan (yet): {w}", flush=True)
            except Exception as e:  # the API or the inbox away for a moment: try again at the next look
                print(f"{_now()} look failed, retrying: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            polls += 1
            if max_polls and polls >= max_polls:
                return 0
    except KeyboardInterrupt:
        print(f"{_now()} stopped", flush=True)
    return 0


def submit(paths: list[str], naming: Naming = "auto", served: bool = False) -> int:
    """Emit brats.scan.arrived by hand for case folder(s), or every complete case under inbox root(s).

    Args:
        paths: case folder(s) or inbox root(s)
        naming: file names: auto (per case), brats2019 (flair/t1/t1ce/t2) or brats2023 (t2f/t1n/t1c/t2w)
        served: send each scan to the `brats serve` processes (a warm model, seconds) instead of emitting the event
    """
    scans = [scan for path in paths for scan in scans_at(path, naming)]
    deliver(scans, "submit", naming, served)
    for s in scans:
        inbox = Path(s.path).parent.parent if s.case.grade else Path(s.path).parent  # <inbox>/[<grade>/]<case>/
        try:
            record(state_path(inbox), [s], "submit")  # so that a watcher of this inbox does not announce it again
        except OSError as e:
            print(f"note: {state_path(inbox)} not written ({e.strerror or e})", file=sys.stderr)
        print(f"{'sent segment-scan' if served else f'emitted {EVENT}'} {s.case.case_id} {s.path}")
    return 0
