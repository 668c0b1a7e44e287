"""The model registry: one folder per trained model version, on a local path or an fsspec URL.

::

    <root>/
      BEST                     the version inference uses by default
      <version>/info.json      what the version is and how it scored (storage/versions.py: VersionInfo)
      <version>/<files>        weights.pt, checkpoint.pt, plots, … (bytes written by the caller)

``storage/versions.py`` owns what info.json says (``VersionInfo``, ``ModelVersion``); this module reads
and writes it as JSON. Versions sort by creation time (``v20261125-101500-3f2a``). The registry stores bytes and JSON
only: serializing tensors is the caller's job (``unet/checkpoint.py``), and nothing is unpickled.
Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any

from fsspec.core import url_to_fs

VERSION_PREFIX = "v"


def default_root(env) -> str:
    """Where the ``brats`` command looks for models: ``$BRATS_MODELS``, else the deploy's registry
    (``$BRATS_STORAGE/models`` as deploy/prefect.yaml puts it, ``BRATS_STORAGE`` defaulting to
    ``BRATS_DATA`` as deploy/bootstrap.sh does), else runs/models. A local path or an fsspec URL."""
    storage = env.get("BRATS_STORAGE") or env.get("BRATS_DATA")
    return env.get("BRATS_MODELS") or (f"{storage.rstrip('/')}/models" if storage else "runs/models")


DEFAULT_ROOT = default_root(os.environ)


class Registry:
    INFO = "info.json"

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")
        self.fs, self.path = url_to_fs(self.root)  # credentials: fsspec's own env vars (FSSPEC_S3_KEY, …)

    # ------------------------------------------------------------ files

    def _p(self, *parts: str) -> str:
        for part in parts:
            if not part or "/" in part or part in (".", ".."):
                raise ValueError(f"{self.root}: unsafe registry name {part!r}")
        return "/".join([self.path, *parts])

    def url(self, version: str, name: str) -> str:
        return "/".join([self.root, version, name])

    def put(self, version: str, name: str, data: bytes) -> str:
        """Write one file of a version atomically; returns its URL."""
        final = self._p(version, name)
        tmp = self._p(version, f".{name}.{secrets.token_hex(4)}.part")
        self.fs.makedirs(self._p(version), exist_ok=True)
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        self.fs.mv(tmp, final)
        return self.url(version, name)

    def get(self, version: str, name: str) -> bytes:
        try:
            with self.fs.open(self._p(version, name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(version, name)}: not in the registry") from None

    def exists(self, version: str, name: str) -> bool:
        return self.fs.exists(self._p(version, name))

    # ------------------------------------------------------------ versions

    @staticmethod
    def new_id() -> str:
        return f"{VERSION_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"

    def create(self, info: dict[str, Any]) -> str:
        """A new version with this raw info.json (``storage.versions.ModelVersion.open`` for a typed one)."""
        version = self.new_id()
        self.put(
            version,
            "info.json",
            json.dumps({"version": version, "created": time.time(), **info}, indent=2, default=str).encode(),
        )
        return version

    def info(self, version: str) -> dict[str, Any]:
        """The raw info.json (``storage.versions.ModelVersion.info`` reads it typed)."""
        return json.loads(self.get(version, self.INFO))

    def update_info(self, version: str, **fields: Any) -> dict[str, Any]:
        info = {**self.info(version), **fields}
        self.put(version, "info.json", json.dumps(info, indent=2, default=str).encode())
        return info

    def versions(self) -> list[dict[str, Any]]:
        """Info of every version, oldest first; ``best`` marks the default one."""
        try:
            names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False))
        except FileNotFoundError:
            return []
        best = self.best()
        out = []
        for name in names:
            if name.startswith(VERSION_PREFIX) and self.exists(name, "info.json"):
                out.append({**self.info(name), "best": name == best})
        return sorted(out, key=lambda i: (i.get("created", 0), i["version"]))  # ids made in one second tie

    def best(self) -> str | None:
        try:
            with self.fs.open(self._p("BEST"), "rb") as f:
                return f.read().decode().strip() or None
        except FileNotFoundError:
            return None

    def set_best(self, version: str) -> None:
        self.info(version)  # must exist
        tmp = self._p(f".BEST.{secrets.token_hex(4)}.part")
        with self.fs.open(tmp, "wb") as f:
            f.write(version.encode())
        self.fs.mv(tmp, self._p("BEST"))

    def resolve(self, version: str | None = None) -> str:
        """``None``/``"best"`` -> the best version, ``"latest"`` -> the newest, else the id itself."""
        if version in (None, "", "best"):
            best = self.best()
            if best is None:
                raise FileNotFoundError(f"{self.root}: no model marked best (train one with `brats train`)")
            return best
        if version == "latest":
            all_ = self.versions()
            if not all_:
                raise FileNotFoundError(f"{self.root}: no model versions")
            return all_[-1]["version"]
        self.info(version)
        return version
