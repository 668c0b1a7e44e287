"""An inbox of new scans on disk: which cases are complete, what was announced, what is done.

No Prefect here: ``brats watch`` and ``brats submit`` (``flows/cli/events.py``) turn what this finds
into events, and the ``sweep`` flow (``flows/sweep.py``) into inference runs.

* ``scan_inbox``: the complete cases of an inbox, found by the same layout walker as ingestion
  (``storage.nifti.discover``: ``<case>/`` or ``{HGG,LGG}/<case>/``, every naming), each with the
  size and mtime of its four modality files (its *signature*); a case still missing a file, or a
  folder being assembled under a hidden name (``.upload-…``), is listed as waiting.
* ``Watcher``: polls an inbox and announces each complete case once its signature stayed the same
  across two polls, once per version of its files.
* The announcements live in ``<inbox>/.brats-watch.json`` (``load_state``/``record``), written
  atomically: a restarted watcher announces nothing twice, and ``brats submit`` records what it
  sent there too, so the watcher does not announce it again.
* ``is_done``: a case whose record (``storage.outputs``) says it was made as asked and is newer
  than its files; inference itself skips on the same record after checking the sha256s.
* ``standing``: where each folder of an inbox stands: incomplete (why), pending, failed (why),
  segmented (by which model version, and whether that is still the best); ``brats inbox`` prints it
  and the ``sweep`` flow's artifact shows it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from storage.brats import MODALITIES
from storage.cases import CaseFiles, InvalidCase, case_files, discover
from storage.outputs import failed, finished, segmented

STATE_NAME = ".brats-watch.json"  # the inbox's memory of what was announced


@dataclass(frozen=True)
class Scan:
    """A case folder whose four modalities are all present and not empty."""

    case: CaseFiles
    path: str  # the case folder, absolute
    signature: tuple  # ((channel, size, mtime_ns), ...) of the modality files
    newest: float  # newest mtime of those files (s)


def scan_of(case: CaseFiles) -> Scan | None:
    """The case's scan, or None while a modality file is empty or vanished."""
    sig = []
    for channel in MODALITIES:
        try:
            st = os.stat(case.files[channel])
        except OSError:
            return None
        if st.st_size == 0:
            return None
        sig.append((channel, st.st_size, st.st_mtime_ns))
    folder = str(Path(case.files[MODALITIES[0]]).parent.resolve())
    return Scan(case, folder, tuple(sig), max(s[2] for s in sig) / 1e9)


def scan_inbox(root: str | Path, naming: str = "auto") -> tuple[dict[str, Scan], list[str]]:
    """Complete scans of an inbox by case id, and one line for each folder not complete (yet)."""
    root = Path(root)
    try:
        found = discover(root, naming=naming)
    except FileNotFoundError:
        if root.is_dir():  # an empty inbox is no error
            return {}, []
        raise FileNotFoundError(f"{root}: no such inbox folder") from None
    complete, waiting = {}, [str(p) for p in found.problems]
    for case in found.cases:
        scan = scan_of(case)
        if scan is None:
            waiting.append(f"{case.files[MODALITIES[0]]}: a modality file is empty or vanished")
        else:
            complete[case.case_id] = scan
    return complete, waiting


def scans_at(path: str | Path, naming: str = "auto") -> list[Scan]:
    """The scans a path names: a case folder, or every complete case under an inbox root."""
    path = Path(path)
    try:
        scan = scan_of(case_files(path, None, naming))
    except InvalidCase as e:
        if any(path.glob("*.nii*")):  # a case folder with something wrong
            raise ValueError(str(e)) from None
        complete, waiting = scan_inbox(path, naming)
        if not complete:
            raise ValueError(f"{path}: no complete case here ({'; '.join(waiting) or 'empty'})") from None
        return list(complete.values())
    if scan is None:
        raise ValueError(f"{path}: a modality file is empty")
    return [scan]


# ------------------------------------------------------------------ what was announced


def _signature(value) -> tuple | None:
    return tuple(tuple(x) for x in value) if value else None


def state_path(inbox: str | Path) -> Path:
    return Path(inbox) / STATE_NAME


def load_state(path: str | Path) -> dict[str, dict]:
    """``{case: {"path", "signature", "at", "by"}}`` of every case announced from this inbox."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable watcher state ({e}); move it away to start afresh") from None
    return {cid: {**v, "signature": _signature(v.get("signature"))} for cid, v in data.get("emitted", {}).items()}


def record(path: str | Path, scans: list[Scan], by: str, at: float | None = None) -> None:
    """Note ``scans`` as announced (read-modify-write, atomic rename)."""
    path = Path(path)
    emitted = load_state(path)
    for s in scans:
        emitted[s.case.case_id] = {
            "path": s.path,
            "signature": s.signature,
            "at": time.time() if at is None else at,
            "by": by,
        }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(json.dumps({"emitted": emitted}, indent=1, default=list))
    os.replace(tmp, path)


def announced(path: str | Path, scan: Scan) -> dict | None:
    """The announcement of this very version of the scan's files, if any."""
    note = load_state(path).get(scan.case.case_id)
    return note if note and note.get("signature") == scan.signature else None


class Watcher:
    """Look at an inbox; announce (``emit``) each complete scan once per version of its files, once it is
    stable: the same at two looks (``brats watch`` looks again after ``settle`` quiet seconds)."""

    def __init__(
        self,
        inbox: str | Path,
        emit: Callable[[list[Scan]], None],
        state: str | Path | None = None,
        naming: str = "auto",
    ):
        self.inbox = Path(inbox)
        if not self.inbox.is_dir():
            raise FileNotFoundError(f"{self.inbox}: no such inbox folder (create it: mkdir -p {self.inbox})")
        self.state = Path(state) if state else state_path(self.inbox)
        self.naming, self.emit = naming, emit
        self.previous: dict[str, tuple] = {}  # case -> signature at the last poll
        self.unsettled = False  # complete scans not announced yet: another look is due
        self.waiting: list[str] = []  # folders not (yet) a complete scan, each with its reason
        self.new_waiting: list[str] = []  # ... those this look found first (the watcher logs them)
        load_state(self.state)  # unreadable state: say so now, not at the first announcement

    def poll(self) -> list[Scan]:
        """One look at the inbox; returns the scans announced by this poll."""
        complete, waiting = scan_inbox(self.inbox, self.naming)
        self.new_waiting = [w for w in waiting if w not in self.waiting]
        self.waiting = waiting
        emitted = load_state(self.state)  # re-read: `brats submit` may have announced some meanwhile
        stable = [
            s
            for cid, s in complete.items()
            if self.previous.get(cid) == s.signature and emitted.get(cid, {}).get("signature") != s.signature
        ]
        self.previous = {cid: s.signature for cid, s in complete.items()}
        if stable:
            self.emit(stable)  # raises when the API is down: tried again at the next poll
            record(self.state, stable, "watch")
        done = {s.case.case_id for s in stable}
        self.unsettled = any(
            cid not in done and emitted.get(cid, {}).get("signature") != s.signature for cid, s in complete.items()
        )
        return stable

    def baseline(self) -> int:
        """Record every complete scan as announced without emitting (they are left to the sweep)."""
        complete, _ = scan_inbox(self.inbox, self.naming)
        emitted = load_state(self.state)
        record(self.state, [s for cid, s in complete.items() if cid not in emitted], "baseline", at=0.0)
        return len(complete)


def is_done(scan: Scan, out: str | Path, how: dict) -> bool:
    """Cheap check: a record made as ``how`` says, newer than the scan's files. (Inference re-checks sha256s.)"""
    done = finished(out, scan.case.case_id, how)
    return done is not None and done[1] >= scan.newest


def standing(root: str | Path, out: str | Path, best: str | None, naming: str = "auto") -> list[dict]:
    """One row per folder of the inbox: ``case``, ``status`` (incomplete, pending, failed, segmented),
    ``why`` (incomplete or failed: the reason), ``version`` and ``best`` (segmented: by which model
    version, and whether it is ``best``), ``review`` (the quality estimate's flag); complete scans
    carry their ``scan`` (not shown). A segmentation or failure older than the scan's files is stale:
    the scan is pending again."""
    complete, waiting = scan_inbox(root, naming)
    rows = [
        {"case": _folder(where), "status": "incomplete", "why": why.strip(), "path": where}
        for where, _, why in (w.partition(": ") for w in waiting)
    ]
    return rows + [_stand(scan, out, best) for _, scan in sorted(complete.items())]


def _folder(where: str) -> str:
    """The case a waiting entry names: the folder, or the folder of the (missing or empty) file."""
    path = Path(where)
    return path.parent.name if ".nii" in path.name else path.name


def _stand(scan: Scan, out: str | Path, best: str | None) -> dict:
    cid = scan.case.case_id
    row = {"case": cid, "status": "pending", "why": "", "path": scan.path, "scan": scan}
    done, fault = segmented(out, cid), failed(out, cid)
    if done is not None and done[1] >= scan.newest:
        version = done[0].get("model_version", "")
        row |= {"status": "segmented", "version": version, "best": version == best}
        row["review"] = bool(done[0].get("review"))
    elif fault is not None and fault[1] >= scan.newest:
        row |= {"status": "failed", "why": fault[0].get("reason", ""), "version": fault[0].get("model_version")}
    return row


SWEEP_STATUSES = ("pending", "done", "arriving", "announced", "incomplete")


def sweep_plan(
    roots: list[str], out: str | Path, best: str, how: Callable[[Scan], dict], naming: str = "auto", **wait: float
) -> list[dict]:
    """What the ``sweep`` flow does with each folder (``standing``'s rows): ``done`` (its record says
    it was made as ``how(scan)`` asks, newer than the files), ``announced`` (the watcher announced it
    less than ``wait["grace_s"]`` ago: that run is on its way), ``arriving`` (files changed less than
    ``wait["settle_s"]`` ago), ``incomplete``, else ``pending``: to segment now (a failed one again)."""
    now, rows = time.time(), []
    for root in roots:
        for row in standing(root, out, best, naming):
            if scan := row.get("scan"):
                note = announced(state_path(root), scan)
                if is_done(scan, out, how(scan)):
                    row["status"] = "done"
                elif note and now - note.get("at", 0) < wait.get("grace_s", 900.0):
                    row["status"] = "announced"
                elif now - scan.newest < wait.get("settle_s", 60.0):
                    row["status"] = "arriving"
                else:
                    row["status"] = "pending"
            rows.append(row)
    return rows


def after_sweep(plan: list[dict], out: str | Path, best: str) -> list[dict]:
    """The rows of ``sweep_plan`` as they stand once the sweep ran (``standing``), each with what the
    sweep did with it (``sweep``: its planned status)."""
    return [{**(_stand(row["scan"], out, best) if row.get("scan") else row), "sweep": row["status"]} for row in plan]
