"""What several test modules build: small synthetic raw folders, a registered tiny model, scans
copied into an inbox, stores and output folders as snapshots that compare equal when they hold
the same data; a free port, a way to stop the processes a test started and to see whether one is alive."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from storage.brats import MODALITIES
from storage.cases import discover
from storage.store import SliceStore
from storage.synth import write_dataset
from unet.predict import Prediction

SYNTH_SHAPE = (48, 48, 24)


def synth_raw(root: Path, cases: int = 3, seed: int = 11, with_seg: bool = True) -> Path:
    """A raw folder of ``cases`` small synthetic BraTS cases (``SYNTH_SHAPE``)."""
    write_dataset(root, cases=cases, seed=seed, shape=SYNTH_SHAPE, with_seg=with_seg)
    return root


def register_model(root: Path, profile: str = "full", padding: str = "same", seed: int = 0) -> str:
    """An untrained tiny model as the registry's best version."""
    import torch

    from storage.registry import Registry
    from unet.checkpoint import save_model
    from unet.model import UNet, UNetConfig

    registry = Registry(str(root))
    version = registry.create({"profile": profile, "status": "complete"})
    torch.manual_seed(seed)
    save_model(registry, version, UNet(UNetConfig(base_channels=4, depth=2, padding=padding)))
    registry.set_best(version)
    return version


def case_folders(raw: Path) -> list[Path]:
    """The case folders of a raw folder laid out as ``raw/<grade>/<case>``."""
    return sorted(p for p in raw.glob("*/*") if p.is_dir())


def new_scan(src: Path, inbox: Path, name: str | None = None, channels=MODALITIES) -> Path:
    """Copy a case's scans (no seg) into the inbox, renamed to ``name``."""
    name = name or src.name
    case = inbox / name
    case.mkdir(parents=True, exist_ok=True)
    for c in channels:
        shutil.copyfile(src / f"{src.name}_{c}.nii.gz", case / f"{name}_{c}.nii.gz")
    return case


def ingest_all(raw, url: str, profile: str = "full", reverse: bool = False) -> None:
    """What the ingest flow does to the store, without Prefect: every case, then split + fingerprint."""
    from tasks.ingest import ingest_case

    store = SliceStore(url, mode="a")
    store.claim_profile(profile)
    cases = discover(raw).cases
    for case in reversed(cases) if reverse else cases:
        ingest_case.fn(case, url, profile)
    store.publish()


def infer_all(raw, out: str, registry_url: str, version: str) -> list[str]:
    """What the infer flow does to the output folder, without Prefect: each case's status."""
    from tasks.infer import infer_case

    return [
        infer_case.fn(case, out, registry_url, version, Prediction(device="cpu", tta=False, batch_size=16))["status"]
        for case in discover(raw).cases
    ]


def _sha(a) -> str:
    a = np.ascontiguousarray(a[:])
    return f"{a.dtype}{a.shape}" + hashlib.sha256(a.tobytes()).hexdigest()


def case_snapshot(store: SliceStore, case_id: str) -> dict:
    """A case's attrs and array checksums; not its source files' stamps, which say when those files were
    last written as seen at ingestion (none for files written under 2 s before), not what the case holds."""
    label = store.label(case_id)
    attrs = {k: v for k, v in store.attrs(case_id).items() if k != "stamps"}
    return {"attrs": attrs, "image": _sha(store.image(case_id)), "label": label and _sha(label)}


def store_snapshot(url: str) -> dict:
    """Everything a reader of the store gets: root attrs and, per complete case, attrs + array checksums."""
    store = SliceStore(url)
    return {"root": dict(store.root.attrs), "cases": {c: case_snapshot(store, c) for c in store.case_ids()}}


def segmentation_snapshot(seg: Path) -> tuple[str, list]:
    """A segmentation's voxels (checksum) and its header's grid."""
    img = nib.load(seg)
    return hashlib.sha256(np.asanyarray(img.dataobj).tobytes()).hexdigest(), img.affine.tolist()


def infer_snapshot(out: Path) -> dict:
    """Per case: the segmentation's voxels and header grid, and the record less its timing."""
    snap = {seg.name: segmentation_snapshot(seg) for seg in sorted(out.glob("*_seg.nii.gz"))}
    for record in sorted(r for r in out.glob("*.json") if not r.name.endswith(".failed.json")):
        done = {k: v for k, v in json.loads(record.read_text()).items() if k != "seconds"}
        snap[record.name] = {**done, "segmentation": Path(done["segmentation"]).relative_to(out).as_posix()}
    return snap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie is gone too); reads /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # the name in parentheses may hold spaces
    except FileNotFoundError:
        return False


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
