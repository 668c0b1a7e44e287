"""New scans in, segmentations out: ``brats watch``, ``brats submit``, ``brats sweep`` and the ``sweep`` flow.

    brats watch INBOX     poll INBOX; a case whose four modalities are all there and whose file sizes
                          and mtimes did not change between two polls is complete: emit one
                          ``brats.scan.arrived`` event for it and note it in INBOX/.brats-watch.json
    brats submit PATH     emit the same event by hand for a case folder (or every case under a root)
    brats sweep INBOX     segment every complete scan in INBOX that has no segmentation by the current
                          model yet (the ``sweep`` flow, also deployed on a schedule), so that nothing
                          is missed while the watcher was down

The ``infer`` deployment has a trigger on ``brats.scan.arrived`` (deploy/prefect.yaml) whose
parameters come from the event payload (``path``). Nothing is segmented twice: the infer flow skips
a case whose ``<case>.json`` names the same model version and input sha256s; the watcher emits a
case once per version of its files (its state file); the sweep leaves alone what is done, what is
still arriving, and what the watcher announced a short while ago (that run is on its way).

Paths in the event are absolute: the inbox must be mounted at the same path on the watcher and on
the workers that run inference.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger
from prefect.states import Failed
from pydantic import Field

from flows.infer import InferParams, PredictOptions, infer
from flows.report import report
from storage.nifti import GRADES, MODALITIES, NAMINGS, CaseFiles, InvalidCase, case_files
from storage.registry import DEFAULT_ROOT, Registry
from tasks.artifacts import markdown, table
from tasks.infer import outputs

EVENT = "brats.scan.arrived"
RESOURCE_PREFIX = "brats.scan."
STATE_NAME = ".brats-watch.json"  # the watcher's memory, inside the inbox by default


# ------------------------------------------------------------------ what is in an inbox


@dataclass(frozen=True)
class Scan:
    """A case folder whose four modalities are all present."""

    case: CaseFiles
    path: str  # the case folder, absolute
    signature: tuple  # ((channel, size, mtime_ns), ...) of the modality files
    newest: float  # newest mtime of those files (s)
    naming: str = "auto"  # how its files were found (passed on to the inference run)


def _scan(case: CaseFiles, naming: str = "auto") -> Scan | None:
    sig = []
    for channel in MODALITIES:
        try:
            st = os.stat(case.files[channel])
        except OSError:  # vanished between listing and stat: not complete
            return None
        if st.st_size == 0:
            return None
        sig.append((channel, st.st_size, st.st_mtime_ns))
    folder = str(Path(case.files[MODALITIES[0]]).parent.resolve())
    return Scan(case, folder, tuple(sig), max(s[2] for s in sig) / 1e9, naming)


def case_folders(root: Path) -> list[tuple[Path, str | None]]:
    """Candidate case folders of an inbox: ``<root>/<case>/`` and ``<root>/{HGG,LGG}/<case>/``.

    Hidden folders (``.upload-…``) are left out: a sender may assemble a case there and rename it.
    """
    try:
        entries = sorted(root.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise FileNotFoundError(f"{root}: cannot read inbox ({e.strerror or e})") from None
    folders: list[tuple[Path, str | None]] = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if entry.name in GRADES:
            folders += [(p, entry.name) for p in sorted(entry.iterdir(), key=lambda p: p.name) if p.is_dir() and not p.name.startswith(".")]
        else:
            folders.append((entry, None))
    return folders


def scan_inbox(root: str | Path, naming: str = "auto") -> tuple[dict[str, Scan], list[str]]:
    """Complete scans of an inbox by case id, and the folders not complete (yet)."""
    complete: dict[str, Scan] = {}
    waiting: list[str] = []
    for folder, grade in case_folders(Path(root)):
        try:
            scan = _scan(case_files(folder, grade, naming), naming)
        except InvalidCase as e:  # a modality missing (still arriving) or an unusable name
            waiting.append(str(e))
            continue
        if scan is None:
            waiting.append(f"{folder}: a file is empty or vanished")
        elif scan.case.case_id in complete:
            waiting.append(f"{folder}: case id {scan.case.case_id} also at {complete[scan.case.case_id].path}")
        else:
            complete[scan.case.case_id] = scan
    return complete, waiting


# ------------------------------------------------------------------ the event


def scan_event(scan: Scan, source: str):
    from prefect.events import Event

    return Event(
        event=EVENT,
        resource={"prefect.resource.id": RESOURCE_PREFIX + scan.case.case_id, "prefect.resource.name": scan.case.case_id},
        payload={
            "path": scan.path,
            "case": scan.case.case_id,
            "naming": scan.naming,
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


def _throwaway_api() -> bool:
    """True when the CLI is on the ephemeral API it started itself: events sent there trigger nothing."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_API_URL

        server = SubprocessASGIServer._instances.get(None)
        return bool(server is not None and server.running and server.api_url == PREFECT_API_URL.value())
    except Exception:  # private detail of Prefect; when it moves, do not get in the way
        return False


# ------------------------------------------------------------------ the watcher


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class Watcher:
    """Poll an inbox; emit each complete, stable scan once per version of its files.

    State (``{"emitted": {case: {"path", "signature", "at"}}}``) is written after every emission,
    atomically, so a restarted watcher emits neither twice nor never.
    """

    def __init__(self, inbox: str | Path, state: str | Path | None = None, naming: str = "auto",
                 emit: Callable[[list], None] = send):
        self.inbox = Path(inbox)
        if not self.inbox.is_dir():
            raise FileNotFoundError(f"{self.inbox}: no such inbox folder")
        self.state_path = Path(state) if state else self.inbox / STATE_NAME
        self.naming, self.emit = naming, emit
        self.previous: dict[str, tuple] = {}  # case -> signature at the last poll
        self.emitted: dict[str, dict] = load_state(self.state_path)

    def poll(self) -> list[Scan]:
        """One look at the inbox; returns the scans announced by this poll."""
        complete, _ = scan_inbox(self.inbox, self.naming)
        stable = [
            s for cid, s in complete.items()
            if self.previous.get(cid) == s.signature and _sig(self.emitted.get(cid, {}).get("signature")) != s.signature
        ]
        self.previous = {cid: s.signature for cid, s in complete.items()}
        if not stable:
            return []
        self.emit([scan_event(s, "watch") for s in stable])  # raises when the API is down: retried next poll
        for s in stable:
            self.emitted[s.case.case_id] = {"path": s.path, "signature": s.signature, "at": time.time()}
        save_state(self.state_path, self.emitted)
        return stable

    def baseline(self) -> int:
        """Record every complete scan as announced without emitting (they are left to the sweep)."""
        complete, _ = scan_inbox(self.inbox, self.naming)
        for cid, s in complete.items():
            self.emitted.setdefault(cid, {"path": s.path, "signature": s.signature, "at": 0.0})
        save_state(self.state_path, self.emitted)
        return len(complete)


def _sig(value) -> tuple | None:
    return tuple(tuple(x) for x in value) if value else None


def load_state(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable watcher state ({e}); move it away to start afresh") from None
    return {cid: {**v, "signature": _sig(v.get("signature"))} for cid, v in data.get("emitted", {}).items()}


def save_state(path: Path, emitted: dict[str, dict]) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.part")
    tmp.write_text(json.dumps({"event": EVENT, "emitted": emitted}, indent=1, default=list))
    os.replace(tmp, path)


# ------------------------------------------------------------------ the sweep flow


class SweepParams(PredictOptions):
    """Parameters of an inbox sweep (rendered as a form in the Prefect UI)."""

    inbox: list[str] = Field(description="Inbox folders: <case>/ or {HGG,LGG}/<case>/ with the four modalities", min_length=1)
    settle_s: float = Field(60.0, ge=0, description="Leave a scan whose files changed less than this many seconds ago (still arriving)")
    grace_s: float = Field(900.0, ge=0, description="Leave a scan the watcher announced less than this many seconds ago (its triggered run is on its way)")


def is_done(scan: Scan, out: str, version: str, tta: bool) -> bool:
    """Cheap check: a record by this model, newer than the scan's files. (The infer flow re-checks sha256s.)"""
    seg, record = outputs(out, scan.case.case_id)
    try:
        done = json.loads(record.read_text())
        fresh = record.stat().st_mtime >= scan.newest and seg.is_file()
    except (OSError, ValueError):
        return False
    return fresh and done.get("model_version") == version and done.get("tta") == tta


@flow(name="sweep", log_prints=True)
def sweep(params: SweepParams) -> dict:
    log = get_run_logger()
    version = Registry(params.models).resolve(params.model)
    now = time.time()
    rows, pending = [], []
    for root in params.inbox:
        complete, waiting = scan_inbox(root, params.naming)
        announced = load_state(Path(root) / STATE_NAME)
        for w in waiting:
            rows.append({"case": w, "status": "incomplete"})
        for cid, scan in sorted(complete.items()):
            note = announced.get(cid, {})
            if is_done(scan, params.out, version, params.tta):
                status = "done"
            elif note.get("signature") == scan.signature and now - note.get("at", 0) < params.grace_s:
                status = "announced"
            elif now - scan.newest < params.settle_s:
                status = "arriving"
            else:
                status = "pending"
                pending.append(scan.path)
            rows.append({"case": cid, "status": status, "path": scan.path})
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pending", "done", "arriving", "announced", "incomplete")}
    log.info("model %s: %s", version, counts)

    summary = {"model": version, "out": params.out, **counts, "written": 0, "skipped": 0, "failed": 0}
    state = None
    if pending:
        state = infer(
            InferParams(inputs=pending, out=params.out, model=version, models=params.models, naming=params.naming,
                        tta=params.tta, device=params.device, batch_size=params.batch_size),
            return_state=True,
        )
        result = state.result(raise_on_failure=False)
        if isinstance(result, dict):
            summary.update({k: result[k] for k in ("written", "skipped", "failed") if k in result})
    _artifacts(rows, summary)
    if state is not None and not state.is_completed():
        return Failed(message=f"infer: {state.message}", data=summary)
    return summary


def _artifacts(rows: list[dict], summary: dict) -> None:
    table(rows or [{"case": "", "status": "inbox empty"}], "sweep-cases", "Scans in the inbox and what the sweep did with them")
    lines = [f"# Inbox sweep → `{summary['out']}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items() if k != "out"]
    markdown("\n".join(lines), "sweep-summary", "Inbox sweep summary")


# ------------------------------------------------------------------ the commands


def add_command(sub) -> None:
    p = sub.add_parser("watch", help=f"watch an inbox; emit {EVENT} for each complete new scan")
    p.add_argument("inbox", help="inbox folder: <case>/ or {HGG,LGG}/<case>/")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between polls (a scan is complete once unchanged across two)")
    p.add_argument("--state", default=None, help=f"state file (default: INBOX/{STATE_NAME})")
    p.add_argument("--naming", choices=NAMINGS, default="auto")
    p.add_argument("--max-polls", type=int, default=0, help="stop after N polls (default: run until stopped)")
    p.add_argument("--baseline", action="store_true", help="record the scans already there as announced, without emitting")
    p.set_defaults(run=run_watch)

    p = sub.add_parser("submit", help=f"emit {EVENT} by hand for case folder(s) or every case under a root")
    p.add_argument("paths", nargs="+", metavar="PATH", help="case folder(s) or inbox root(s)")
    p.add_argument("--naming", choices=NAMINGS, default="auto")
    p.set_defaults(run=run_submit)

    p = sub.add_parser("sweep", help="segment every complete scan in the inbox not yet segmented by the current model")
    p.add_argument("inbox", nargs="+", help="inbox folder(s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=None, help="model version or 'latest' (default: the best)")
    p.add_argument("--models", default=DEFAULT_ROOT, help=f"model registry (default: {DEFAULT_ROOT}, or $BRATS_MODELS)")
    p.add_argument("--naming", choices=NAMINGS, default="auto")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--settle", type=float, default=60.0, help="seconds a scan's files must have been unchanged")
    p.add_argument("--grace", type=float, default=900.0, help="seconds a scan announced by the watcher is left to its triggered run")
    p.set_defaults(run=run_sweep)


def _need_server(command: str) -> None:
    if _throwaway_api():
        raise ValueError(f"no Prefect server configured (set PREFECT_API_URL): {command} would emit into a throwaway API")


def run_watch(args) -> int:
    _need_server("watch")
    watcher = Watcher(args.inbox, args.state, args.naming)
    if args.baseline:
        print(f"{_now()} baseline: {watcher.baseline()} scan(s) recorded in {watcher.state_path}", flush=True)
    print(f"{_now()} watching {watcher.inbox} every {args.interval:g}s (state {watcher.state_path})", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    polls = 0
    try:
        while True:
            try:
                for s in watcher.poll():
                    print(f"{_now()} emitted {EVENT} {s.case.case_id} {s.path}", flush=True)
            except Exception as e:  # the API or the inbox away for a moment: try again next poll
                print(f"{_now()} poll failed, retrying: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            polls += 1
            if args.max_polls and polls >= args.max_polls:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        print(f"{_now()} stopped", flush=True)
        return 0


def run_submit(args) -> int:
    _need_server("submit")
    scans: list[Scan] = []
    for path in map(Path, args.paths):
        try:
            scan = _scan(case_files(path, None, args.naming), args.naming)
        except InvalidCase as e:
            if not any(path.glob("*.nii*")):  # not a case folder: a root of cases
                complete, waiting = scan_inbox(path, args.naming)
                if not complete:
                    raise ValueError(f"{path}: no complete case here ({'; '.join(waiting) or 'empty'})") from None
                scans += complete.values()
                continue
            raise ValueError(str(e)) from None
        if scan is None:
            raise ValueError(f"{path}: a modality file is empty")
        scans.append(scan)
    send([scan_event(s, "submit") for s in scans])
    for s in scans:
        print(f"emitted {EVENT} {s.case.case_id} {s.path}")
    return 0


def run_sweep(args) -> int:
    params = SweepParams(
        inbox=args.inbox, out=args.out, model=args.model, models=args.models, naming=args.naming, tta=args.tta,
        device=args.device, batch_size=args.batch_size, settle_s=args.settle, grace_s=args.grace,
    )
    return report(sweep(params, return_state=True))
