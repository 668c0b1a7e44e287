"""The watcher: a scan is announced (``brats.scan.arrived``) once it is complete (four modalities) and
its files have stopped changing; once per version of its files; its state survives a restart and an
API that is down; ``brats watch`` reacts to file-system events within seconds."""

from __future__ import annotations

import json
import os
import time

import pytest

from flows.cli.events import EVENT, scan_event
from storage.brats import MODALITIES
from storage.inbox import STATE_NAME, Watcher
from tests.helpers import case_folders, new_scan


def test_watcher_emits_each_complete_stable_scan_once(small_raw, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    src = case_folders(small_raw)
    sent: list = []
    watcher = Watcher(inbox, emit=lambda scans: sent.extend(scan_event(s, "watch") for s in scans))

    case = new_scan(src[0], inbox, "NEW_001", channels=MODALITIES[1:])  # flair not there yet
    assert watcher.poll() == [] and watcher.new_waiting == watcher.waiting
    (why,) = watcher.waiting
    assert "NEW_001" in why and "flair" in why  # the folder, and what is missing
    assert watcher.poll() == [] and watcher.new_waiting == [] and sent == []  # said once
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


def test_brats_watch_announces_a_scan_seconds_after_its_last_file(prefect_api, small_raw, tmp_path, capsys):
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
    src = case_folders(small_raw)[0]
    new_scan(src, inbox, "NEW_001", channels=("flair", "t1", "t1ce"))
    time.sleep(1.5)
    assert "NEW_001" not in load_state(inbox / STATE_NAME)  # t2 still missing: not complete
    assert "not a complete scan (yet): " in capsys.readouterr().out  # and the watcher's log says why
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
    new_scan(case_folders(small_raw)[0], inbox, "NEW_001")
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
