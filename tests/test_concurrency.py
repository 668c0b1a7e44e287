"""Concurrency: writers that meet on one store or one output folder leave it valid.

* two processes rewriting the same case as fast as they can, while this process reads it: a case
  the store calls complete always holds one writer's whole arrays (the per-case lock in
  ``SliceStore.write_case``), and neither writer fails;
* two ingestions of the same raw folder at once end with the store a single ingestion makes;
* two first ingestions claiming different profiles at once: exactly one wins;
* two inferences of the same case at once (two model versions) leave one valid segmentation and
  the record that belongs to it (the output-folder lock in ``tasks.infer``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from storage.cases import discover
from storage.store import SliceStore
from tasks.ingest import ingest_case
from tests.conftest import ROOT, child_env
from tests.helpers import ingest_all, store_snapshot, synth_raw
from unet.predict import Prediction

CASE = "BraTS19_RACE_0001_1"
SHAPE_IMG, SHAPE_LAB = (8, 4, 64, 64), (8, 64, 64)

WRITER = """
import os, random, sys, time
import numpy as np
from storage.store import SliceStore

url, writer, seconds, go = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
store = SliceStore(url, mode="a")
open(f"{go}.ready{writer}", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
errors, n, end = 0, 0, time.monotonic() + seconds
while time.monotonic() < end:
    nonce = writer * 100_000 + n  # every write is told apart by its nonce, in its attrs and its arrays
    try:
        store.write_case("%s", np.full(%r, nonce, np.float32), np.full(%r, nonce %% 251, np.uint8), {"nonce": nonce})
    except Exception as e:  # without the lock: e.g. ContainsArrayError when the other writer got there first
        errors += 1
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
    n += 1
    time.sleep(random.uniform(0, 0.03))  # now and then a moment when the case stands complete for the reader
print(n, errors)
""" % (CASE, SHAPE_IMG, SHAPE_LAB)


def _env() -> dict:
    return child_env(OMP_NUM_THREADS="1")


def _start_together(cmds: list[list[str]], go: Path, timeout: float = 120) -> list[subprocess.Popen]:
    """Start processes that each touch ``<go>.ready<i>`` when imported, then release them at once."""
    procs = [
        subprocess.Popen(c, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]
    deadline = time.monotonic() + timeout
    while not all(Path(f"{go}.ready{i}").exists() for i in range(len(cmds))):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
            p.communicate() for p in procs if p.poll() is not None
        ]
        time.sleep(0.01)
    go.touch()
    return procs


def _read_whole(url: str):
    """One reader's look at the case: (nonce, image, label) when it is complete before and after reading
    its arrays (so one copy was read whole), None when it is absent or being rewritten."""
    try:
        store = SliceStore(url)
        if CASE not in store.case_ids():
            return None
        before = store.attrs(CASE)
        image, label = store.image(CASE)[:], store.label(CASE)[:]
        after = SliceStore(url).attrs(CASE)
    except Exception:  # the case is being deleted or recreated under us: not a complete case
        return None
    return (before["nonce"], image, label) if after == before and after.get("complete") is True else None


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized")  # zarr's temp files, seen while listing
def test_two_writers_of_one_case_never_leave_a_mixed_case(tmp_path):
    url = str(tmp_path / "s.zarr")
    SliceStore(url, mode="a")
    go = tmp_path / "go"
    procs = _start_together([[sys.executable, "-c", WRITER, url, str(w), "6", str(go)] for w in (0, 1)], go)
    seen, mixed = set(), []
    while any(p.poll() is None for p in procs):
        look = _read_whole(url)
        if look is not None:
            nonce, image, label = look
            seen.add(nonce)
            if not ((image == nonce).all() and (label == nonce % 251).all()):
                mixed.append((nonce, np.unique(image).tolist()[:4]))
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    writes, errors = zip(*(map(int, out.split()) for out, _ in outs))
    assert not mixed, f"complete case with another write's arrays: {mixed[:5]}"
    assert errors == (0, 0), [err for _, err in outs]
    assert min(writes) >= 5 and seen, writes  # both wrote; the reader did see complete cases
    final = _read_whole(url)
    assert final is not None and (final[1] == final[0]).all()


INGEST = """
import sys, time, os
from storage.cases import discover
from tests.helpers import ingest_all
raw, url, order, go, i = sys.argv[1:6]
open(f"{go}.ready{i}", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
ingest_all(raw, url, reverse=order == "reverse")
"""


def test_two_ingestions_at_once_end_like_one(tmp_path):
    raw = synth_raw(tmp_path / "raw", cases=4)
    clean = str(tmp_path / "clean.zarr")
    ingest_all(raw, clean)
    url, go = str(tmp_path / "s.zarr"), tmp_path / "go"
    procs = _start_together(
        [
            [sys.executable, "-c", INGEST, str(raw), url, order, str(go), str(i)]
            for i, order in enumerate(("forward", "reverse"))
        ],
        go,
    )
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert store_snapshot(url) == store_snapshot(clean)


def _waiting_for(lock: Path, timeout: float = 120) -> None:
    """Return once some process or thread is blocked waiting for ``lock`` (a ``->`` line in /proc/locks)."""
    inode, deadline = os.stat(lock).st_ino, time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if fields[1] == "->" and fields[6].rsplit(":", 1)[-1] == str(inode):
                return
        time.sleep(0.01)
    raise AssertionError(f"nothing waited for {lock} within {timeout} s")


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks to see a waiting lock")
def test_a_case_completed_while_an_ingestion_publishes_is_in_its_split(prefect_api, tmp_path):
    """Forced interleaving of two ingestions of one store: the ingest flow has ingested its cases and
    waits for the store lock to publish its split, while another writer completes one more case. The
    split the flow then publishes holds that case, as the split of one ingestion of all the cases does
    (published from a list of cases read before the lock, it would silently leave the case out)."""
    from flows.ingest import ingest
    from storage.store import LOCKS, STORE_LOCK

    raw = synth_raw(tmp_path / "raw", cases=4)
    clean = str(tmp_path / "clean.zarr")
    ingest_all(raw, clean)
    cases = discover(raw).cases
    late = cases[1]  # the other writer's case
    mine = tmp_path / "mine"  # the flow's raw root: the same layout ({HGG,LGG}/<case>/) without the late case
    for case in cases:
        if case is not late:
            folder = Path(case.files["flair"]).parent
            (mine / folder.parent.name).mkdir(parents=True, exist_ok=True)
            (mine / folder.parent.name / folder.name).symlink_to(folder, target_is_directory=True)
    url = str(tmp_path / "s.zarr")
    store = SliceStore(url, mode="a")
    store.claim_profile("full")
    store.claim_slice_shape(tuple(SliceStore(clean).root.attrs["slice_shape"]))  # as an earlier ingestion left it
    lock = Path(url) / LOCKS / f"{STORE_LOCK}.lock"
    result = {}
    with store._lock(STORE_LOCK):
        flow = threading.Thread(target=lambda: result.update(ingest(raw=[str(mine)], store_url=url)))
        flow.start()
        _waiting_for(lock)  # the flow has ingested its three cases and waits to publish
        assert set(SliceStore(url).case_ids()) == {c.case_id for c in cases} - {late.case_id}
        ingest_case.fn(late, url, "full")  # the other writer completes its case now
    flow.join(300)
    assert result["split"] == {k: len(v) for k, v in SliceStore(clean).split.items()}
    assert store_snapshot(url)["root"] == store_snapshot(clean)["root"]


def test_two_first_ingestions_cannot_claim_two_profiles(tmp_path):
    for round_ in range(8):
        url = str(tmp_path / f"s{round_}.zarr")
        SliceStore(url, mode="a")
        barrier, won, lost = threading.Barrier(2), [], []

        def claim(profile):
            store = SliceStore(url, mode="a")
            barrier.wait()
            try:
                store.claim_profile(profile)
                won.append(profile)
            except ValueError:
                lost.append(profile)

        threads = [threading.Thread(target=claim, args=(p,)) for p in ("full", "tp")]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert len(won) == 1 and len(lost) == 1, (round_, won, lost)
        assert SliceStore(url).profile == won[0]


def test_two_inferences_of_one_case_leave_one_valid_pair(small_raw, tmp_path, monkeypatch):
    """Forced interleaving: the first to write its segmentation waits (up to 2 s) for the other to
    write its record. With the output-folder lock the other cannot, so the pairs stay whole."""
    import torch

    import tasks.infer
    from storage.cases import discover
    from storage.registry import Registry
    from unet.checkpoint import save_model
    from unet.model import UNet, UNetConfig

    registry = Registry(str(tmp_path / "models"))
    versions = []
    for seed in (0, 1):
        version = registry.create({"profile": "full", "status": "complete"})
        torch.manual_seed(seed)
        save_model(registry, version, UNet(UNetConfig(base_channels=4, depth=2, padding="same")))
        versions.append(version)
    case = discover(small_raw).cases[0]
    out = tmp_path / "out"

    real_seg, real_bytes = tasks.infer.write_segmentation, tasks.infer.atomic_write_bytes
    record_written = {v: threading.Event() for v in versions}
    first: list[str] = []

    def me() -> str:
        return threading.current_thread().name

    def seg_then_wait(labels, reference, path):
        result = real_seg(labels, reference, path)
        first.append(me())
        if first[0] == me():
            other = next(v for v in versions if v != me())
            record_written[other].wait(2.0)  # without the lock, the other writes seg + record now
        return result

    def record_then_signal(path, data):
        result = real_bytes(path, data)
        record_written[me()].set()
        return result

    monkeypatch.setattr(tasks.infer, "write_segmentation", seg_then_wait)
    monkeypatch.setattr(tasks.infer, "atomic_write_bytes", record_then_signal)
    rows = {}

    def run(version):
        rows[version] = tasks.infer.infer_case.fn(
            case, str(out), registry.root, version, Prediction(device="cpu", tta=False, batch_size=16)
        )

    threads = [threading.Thread(target=run, args=(v,), name=v) for v in versions]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    assert set(rows) == set(versions), "an inference failed"
    assert rows[versions[0]]["WT_ml"] != rows[versions[1]]["WT_ml"], (
        "the two models must segment differently for this test"
    )

    seg, record = tasks.infer.outputs(out, case.case_id)
    labels = np.asanyarray(nib.load(seg).dataobj)  # one whole, readable file
    done = json.loads(record.read_text())
    wt = float(np.isin(labels, (1, 2, 4)).sum()) * float(np.prod(nib.load(seg).header.get_zooms()[:3])) / 1000
    assert done["volumes_ml"]["WT"] == pytest.approx(wt, abs=1e-3), (
        "the record belongs to the other model's segmentation"
    )
    assert rows[done["model_version"]]["WT_ml"] == pytest.approx(wt, abs=1e-3)
    assert sorted(p.name for p in out.iterdir()) == sorted([seg.name, record.name])  # no temp files left
