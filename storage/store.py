"""The slice store: normalized 2D axial slices of every case in one Zarr v3 hierarchy.

::

    <store>/                     attrs: schema, profile, split, fingerprint
      cases/<case_id>/           attrs: sources + sha256 + stamps, affine, shape, zooms, stats, grade,
                                        slice_brain, slice_tumour, complete
        image   (Z, 4, H, W)     float16 z-scores, channels flair, t1, t1ce, t2
        label   (Z, H, W)        uint8 classes 0..3 (absent for unlabeled scans)

Chunks are one slice (``(1, 4, H, W)``, what a training sample reads) inside one shard per case
array (written and read directly: ``storage/shards.py``), so a case is two files on disk or
object storage, not hundreds; blosc-lz4 with byte shuffle compresses the zeros around the brain
away at near-memcpy speed (see benchmarks/ingest.py).

Atomicity: a case group is created with ``complete: false``, its arrays are written, and only then
``complete: true`` is set. Readers list only complete cases, so a killed writer never leaves a half
case that looks whole; the next ingest overwrites it. The store is a local path or any fsspec URL.

Concurrency (two ingestions, or two Dask workers, writing the same case at once): on a local store
``write_case`` holds an exclusive ``flock`` on ``<store>/.locks/<case_id>.lock`` from creating the
group to setting ``complete``, so writers of one case take turns and the last one's case stands
whole; without it, writer B's ``overwrite`` could delete A's arrays and A then mark B's half-written
arrays complete. An older copy of the case is marked incomplete before it is deleted, so a reader
never finds it complete while its arrays go (a reader that must be sure re-reads the attrs after the
arrays: the same complete attrs before and after mean it read one whole copy). Writers of different
cases never wait for each other. The kernel drops a lock when its holder dies (even by ``kill -9``),
so there are no stale locks; the empty lock files stay. Root attrs (schema, profile, split,
fingerprint) change under a store-wide lock the same way, from a fresh read, so two first ingestions
cannot record two profiles nor undo each other's keys. Locks hold between processes of one machine
and on shared file systems with working ``flock`` (local disks; NFSv4). On object storage
(``s3://``, ``gs://``, …) there is no lock and no atomic rename: run one ingestion per store at a
time; if two do write one case at once, the last writer wins and, since both write the same bytes
for the same inputs, the case normally ends whole, but for a moment (or for good, if a writer dies
in that moment) it can be marked complete over the other writer's unfinished arrays. Case ids are
checked (``storage.nifti.CASE_ID``) before they become keys or lock-file names.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from zarr.errors import ContainsGroupError

from storage.cases import CASE_ID
from storage.shards import write_slices
from storage.split import make_split

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking, as on object storage
    fcntl = None

SCHEMA = 2  # 2: cases carry their geometry (orientation, spacing, window) instead of a crop box
LOCKS = ".locks"  # <store>/.locks/<case_id>.lock (local stores); outside the cases/ group readers list
STORE_LOCK = "_store"  # not a valid case id, so never a case's lock


def open_root(url: str, mode: str = "r") -> zarr.Group:
    return zarr.open_group(store=str(url), mode=mode, zarr_format=3)


class SliceStore:
    """Read and write cases of one store. Cheap to create; safe to pass by URL to other processes."""

    def __init__(self, url: str, *, mode: str = "r"):
        self.url = str(url)
        try:
            self.root = open_root(self.url, mode)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}: no slice store here (run `brats ingest` first)") from None
        except ContainsGroupError:  # another process created the store this very moment: open theirs
            self.root = open_root(self.url, mode)
        if mode != "r" and "schema" not in self.root.attrs:
            self._update_root(lambda attrs: {} if "schema" in attrs else {"schema": SCHEMA})
        elif self.root.attrs.get("schema", SCHEMA) != SCHEMA:
            raise ValueError(
                f"{self.url}: store schema {self.root.attrs.get('schema')} but this code reads {SCHEMA}; "
                "ingest into a new store"
            )

    # ------------------------------------------------------------ store-level attributes

    @property
    def profile(self) -> str | None:
        return self.root.attrs.get("profile")

    def claim_profile(self, profile: str) -> None:
        """Record the preprocessing profile, refusing to mix two in one store."""
        if self.root.attrs.get("profile") == profile:  # recorded once and never changed: no lock needed
            return

        def claim(attrs: dict) -> dict:
            have = attrs.get("profile")
            if have not in (None, profile):
                raise ValueError(f"{self.url}: store holds profile {have!r}, not {profile!r}; use another store")
            return {"profile": profile}

        self._update_root(claim)

    def claim_slice_shape(self, shape: tuple[int, int]) -> None:
        """Record the slices' (H, W), refusing a case whose slices have another (training batches
        stack slices of one shape)."""
        if self.root.attrs.get("slice_shape") == list(shape):
            return

        def claim(attrs: dict) -> dict:
            have = attrs.get("slice_shape")
            if have not in (None, list(shape)):
                raise ValueError(
                    f"slices {shape[0]}x{shape[1]} differ from the store's {have[0]}x{have[1]}: profile "
                    f"{attrs.get('profile')} keeps each scan's own grid; use another store, "
                    "or profile tp (a 192x192 window on any grid)"
                )
            return {"slice_shape": list(shape)}

        self._update_root(claim)

    @property
    def split(self) -> dict[str, list[str]]:
        return self.root.attrs.get("split", {})

    @property
    def fingerprint(self) -> str | None:
        return self.root.attrs.get("fingerprint")

    @property
    def quarantine(self) -> list[dict]:
        return self.root.attrs.get("quarantine", [])

    def publish(
        self,
        ratios: Iterable[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        quarantine: Iterable[dict] = (),
        split: dict[str, list[str]] | None = None,
    ) -> dict[str, Any]:
        """Write the split, the last run's quarantine and the fingerprint, all made from the complete cases
        as they are under the store lock: the patient split of the labelled ones (``make_split``), or
        ``split`` as given. Two ingestions that end at once both publish from what the store holds when
        they publish, never from a list of cases read earlier, so the last one to publish is right.

        Returns the split, the fingerprint and the numbers of cases and of labelled cases."""
        published: dict[str, Any] = {}

        def change(attrs: dict) -> dict:
            cases = {case_id: self.attrs(case_id) for case_id in self.case_ids()}
            digest = hashlib.sha256()
            for case_id, a in cases.items():
                digest.update(json.dumps([case_id, a["sha256"], a["profile"]], sort_keys=True).encode())
            grades = {c: a.get("grade") for c, a in cases.items() if a.get("slice_tumour") is not None}
            published.update(  # unlabelled scans are never trained on: only labelled cases are split
                split=make_split(grades, ratios, seed) if split is None else split,
                fingerprint=digest.hexdigest()[:16],
                cases=len(cases),
                labelled=len(grades),
            )
            return {**{k: published[k] for k in ("split", "fingerprint")}, "quarantine": list(quarantine)}

        self._update_root(change)
        return published

    def _update_root(self, change) -> None:
        """Read-modify-write of the root attrs under the store lock, from a fresh read: ``change(attrs)``
        returns the keys to set. Another process's keys are never overwritten by a stale copy."""
        with self._lock(STORE_LOCK):
            self.root = open_root(self.url, "r+")
            if update := change(dict(self.root.attrs)):
                self.root.attrs.update(update)

    # ------------------------------------------------------------ cases

    def _cases(self) -> zarr.Group | None:
        try:
            return self.root["cases"]
        except KeyError:
            return None

    def case_ids(self) -> list[str]:
        """Complete cases only, sorted."""
        cases = self._cases()
        if cases is None:
            return []
        ids = []
        for name, group in cases.groups():
            if group.attrs.get("complete") is True:
                ids.append(name)
        return sorted(ids)

    def attrs(self, case_id: str) -> dict[str, Any]:
        return dict(self.root[f"cases/{case_id}"].attrs)

    def is_current(self, case_id: str, sha256: dict[str, str], profile: str) -> bool:
        """True when the case is complete and was made from these exact files with this profile."""
        try:
            a = self.root[f"cases/{case_id}"].attrs
        except KeyError:
            return False
        return a.get("complete") is True and a.get("sha256") == sha256 and a.get("profile") == profile

    def restamp(self, case_id: str, stamps: dict[str, str] | None) -> None:
        """Record new file stamps (``storage.nifti.stamps``) for a case whose files' bytes are unchanged."""
        with self._lock(case_id):
            self.root[f"cases/{case_id}"].update_attributes({"stamps": stamps})

    def image(self, case_id: str) -> zarr.Array:
        return self.root[f"cases/{case_id}/image"]

    def label(self, case_id: str) -> zarr.Array | None:
        try:
            return self.root[f"cases/{case_id}/label"]
        except KeyError:
            return None

    def write_case(self, case_id: str, image: np.ndarray, label: np.ndarray | None, attrs: dict) -> None:
        """Write (or replace) one case; it becomes visible only when everything is on disk.

        On a local store, writers of the same case take turns (see the module docstring)."""
        _check_id(self.url, case_id)
        with self._lock(case_id):
            try:  # an older copy: hide it before deleting it, so no reader takes a half-deleted case for whole
                self.root[f"cases/{case_id}"].update_attributes({"complete": False})
            except KeyError:
                pass
            group = self.root.create_group(f"cases/{case_id}", overwrite=True, attributes={"complete": False})
            write_slices(group, "image", image)
            if label is not None:
                write_slices(group, "label", label)
            group.update_attributes({**_jsonable(attrs), "complete": True})  # one metadata write

    def delete_case(self, case_id: str) -> None:
        _check_id(self.url, case_id)
        with self._lock(case_id):
            cases = self._cases()
            if cases is not None and case_id in cases:
                del cases[case_id]

    # ------------------------------------------------------------ locking

    def local_path(self) -> Path | None:
        """The store's folder when it is on the local file system (lockable), else None."""
        fs, path = url_to_fs(self.url)
        return Path(path) if isinstance(fs, LocalFileSystem) else None

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """Hold ``<store>/.locks/<name>.lock`` exclusively (flock); a no-op off the local file system."""
        root = self.local_path()
        if root is None or fcntl is None:
            yield
            return
        path = root / LOCKS / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits for the other writer; released on close or death
            yield
        finally:
            os.close(fd)


def _check_id(url: str, case_id: str) -> None:
    """A case id must be safe as a key and a file name: no separators, no ``..``, nothing hidden."""
    if not isinstance(case_id, str) or not CASE_ID.fullmatch(case_id) or ".." in case_id:
        raise ValueError(f"{url}: unsafe case id {case_id!r}: use letters, digits and . _ - only")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
