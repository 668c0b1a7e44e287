"""The slice store: normalized 2D axial slices of every case in one Zarr v3 hierarchy.

::

    <store>/                     attrs: schema, profile, split, fingerprint
      cases/<case_id>/           attrs: sources + sha256, affine, shape, zooms, stats, grade,
                                        slice_brain, slice_tumour, complete
        image   (Z, 4, H, W)     float16 z-scores, channels flair, t1, t1ce, t2
        label   (Z, H, W)        uint8 classes 0..3 (absent for unlabeled scans)

Chunks are one slice (``(1, 4, H, W)``, what a training sample reads) inside one shard per case
array, so a case is two files on disk or object storage, not hundreds; blosc-lz4 with byte shuffle
compresses the zeros around the brain away at near-memcpy speed (see benchmarks/ingest.py).

Atomicity: a case group is created with ``complete: false``, its arrays are written, and only then
``complete: true`` is set. Readers list only complete cases, so a killed writer never leaves a half
case that looks whole; the next ingest overwrites it. The store is a local path or any fsspec URL.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

SCHEMA = 1
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
WRITE = {"write_empty_chunks": True}  # inside a shard an empty chunk costs bytes; checking costs 2x the write


def open_root(url: str, mode: str = "r", storage_options: dict | None = None) -> zarr.Group:
    return zarr.open_group(store=str(url), mode=mode, zarr_format=3, storage_options=storage_options)


class SliceStore:
    """Read and write cases of one store. Cheap to create; safe to pass by URL to other processes."""

    def __init__(self, url: str, *, mode: str = "r", storage_options: dict | None = None):
        self.url = str(url)
        self.storage_options = storage_options
        try:
            self.root = open_root(self.url, mode, storage_options)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}: no slice store here (run `brats ingest` first)") from None
        if mode != "r" and "schema" not in self.root.attrs:
            self.root.attrs.update({"schema": SCHEMA})
        elif self.root.attrs.get("schema", SCHEMA) != SCHEMA:
            raise ValueError(f"{self.url}: store schema {self.root.attrs.get('schema')} but this code reads {SCHEMA}")

    # ------------------------------------------------------------ store-level attributes

    @property
    def profile(self) -> str | None:
        return self.root.attrs.get("profile")

    def claim_profile(self, profile: str) -> None:
        """Record the preprocessing profile, refusing to mix two in one store."""
        have = self.profile
        if have is None:
            self.root.attrs["profile"] = profile
        elif have != profile:
            raise ValueError(f"{self.url}: store holds profile {have!r}, not {profile!r}; use another store")

    @property
    def split(self) -> dict[str, list[str]]:
        return self.root.attrs.get("split", {})

    @property
    def fingerprint(self) -> str | None:
        return self.root.attrs.get("fingerprint")

    @property
    def quarantine(self) -> list[dict]:
        return self.root.attrs.get("quarantine", [])

    def publish(self, split: dict[str, list[str]], quarantine: list[dict] = ()) -> str:
        """Write the split, the last run's quarantine and the fingerprint of the complete cases."""
        digest = hashlib.sha256()
        for case_id in self.case_ids():
            a = self.attrs(case_id)
            digest.update(json.dumps([case_id, a["sha256"], a["profile"]], sort_keys=True).encode())
        fp = digest.hexdigest()[:16]
        self.root.attrs.update({"split": split, "fingerprint": fp, "quarantine": list(quarantine)})
        return fp

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

    def image(self, case_id: str) -> zarr.Array:
        return self.root[f"cases/{case_id}/image"]

    def label(self, case_id: str) -> zarr.Array | None:
        try:
            return self.root[f"cases/{case_id}/label"]
        except KeyError:
            return None

    def write_case(self, case_id: str, image: np.ndarray, label: np.ndarray | None, attrs: dict) -> None:
        """Write (or replace) one case; it becomes visible only when everything is on disk."""
        group = self.root.create_group(f"cases/{case_id}", overwrite=True, attributes={"complete": False})
        z, c, h, w = image.shape
        group.create_array("image", data=image, chunks=(1, c, h, w), shards=(z, c, h, w), compressors=COMPRESSOR, config=WRITE)
        if label is not None:
            group.create_array("label", data=label, chunks=(1, h, w), shards=(z, h, w), compressors=COMPRESSOR, config=WRITE)
        group.attrs.update({**_jsonable(attrs), "complete": True})

    def delete_case(self, case_id: str) -> None:
        cases = self._cases()
        if cases is not None and case_id in cases:
            del cases[case_id]


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


def make_split(grades: dict[str, str | None], ratios: Iterable[float] = (0.7, 0.15, 0.15), seed: int = 0) -> dict[str, list[str]]:
    """Patient-level train/val/test split, deterministic and stratified by grade.

    Within each grade, cases are ordered by a hash of (seed, case id) — so the order does not depend
    on which other cases exist — and cut by largest-remainder rounding of the ratios.
    """
    names = ("train", "val", "test")
    ratios = np.asarray(list(ratios), dtype=float)
    if ratios.shape != (3,) or (ratios < 0).any() or ratios.sum() <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers, got {ratios.tolist()}")
    ratios = ratios / ratios.sum()
    split: dict[str, list[str]] = {n: [] for n in names}
    by_grade: dict[str, list[str]] = {}
    for case_id, grade in grades.items():
        by_grade.setdefault(grade or "unknown", []).append(case_id)
    for grade in sorted(by_grade):
        ids = sorted(by_grade[grade], key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
        exact = ratios * len(ids)
        counts = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - counts), kind="stable")[: len(ids) - counts.sum()]:
            counts[i] += 1
        start = 0
        for name, n in zip(names, counts):
            split[name] += ids[start : start + n]
            start += n
    return {n: sorted(v) for n, v in split.items()}
