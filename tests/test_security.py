"""Security: nothing is unpickled from the registry or the store, case ids are checked before they
become paths or keys, no secrets in the repository, the Prefect API listens on loopback by default."""

from __future__ import annotations

import ast
import io
import json
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.cases import CaseFiles, InvalidCase
from storage.registry import Registry
from storage.store import SliceStore
from unet.checkpoint import CHECKPOINT, WEIGHTS, RegistryCheckpoint, load_model, save_model
from unet.model import UNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
CODE = ("storage", "unet", "tasks", "flows", "benchmarks")


def _sources():
    for folder in CODE:
        yield from sorted((ROOT / folder).rglob("*.py"))


# ----------------------------------------------------------------------------- no unpickling


class Payload:
    """Unpickling this opens (creates) a file: proof that code ran. Harmless, but a real attack."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"conv.weight": torch.zeros(1), "extra": Payload(marker)}, buf)
    return buf.getvalue()


def test_the_payload_is_live_when_unpickled_unsafely(tmp_path):
    """Control: without weights_only the same bytes do run code, so the refusals below mean something."""
    marker = tmp_path / "pwned"
    torch.load(io.BytesIO(_evil_bytes(marker)), weights_only=False)
    assert marker.exists()


def test_a_malicious_pickle_in_the_registry_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    registry = Registry(str(tmp_path / "models"))
    version = registry.create({"profile": "full", "status": "complete"})
    save_model(registry, version, UNet(UNetConfig(base_channels=4, depth=2, padding="same")))
    registry.set_best(version)
    registry.put(version, WEIGHTS, _evil_bytes(marker))  # someone swapped the weights
    registry.put(version, CHECKPOINT, _evil_bytes(marker))  # and the training checkpoint
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model(registry)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        RegistryCheckpoint(registry, version).load()
    assert not marker.exists()


def test_every_torch_load_is_weights_only_and_nothing_else_unpickles():
    """Static check of the code: torch.load(..., weights_only=True) only; no pickle/dill/joblib loads,
    no numpy allow_pickle, no pickle codec for Zarr."""
    bad = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                )
                if any(
                    n.split(".")[0]
                    in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal")
                    for n in names
                ):
                    bad.append(f"{where}: imports {names}")
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            kwargs = {k.arg: k.value for k in node.keywords}
            if name == "load" and owner == "torch":
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    bad.append(f"{where}: torch.load without weights_only=True")
            if name in ("load", "loads") and owner in ("np", "numpy") and "allow_pickle" in kwargs:
                bad.append(f"{where}: numpy load with allow_pickle")
            if name in ("read_pickle", "Pickle"):
                bad.append(f"{where}: {name}")
    assert not bad, bad
    loads = [p for p in _sources() if "torch.load(" in p.read_text()]
    assert [p.relative_to(ROOT).as_posix() for p in loads] == ["unet/checkpoint.py"]  # the one door in


def test_a_store_asking_for_a_pickle_codec_is_refused_not_unpickled(tmp_path):
    """The store is Zarr v3 JSON metadata + numeric chunks: a tampered array that names a pickle codec
    (and holds a pickle as its chunk) fails to open; nothing runs."""
    marker = tmp_path / "pwned"
    url = tmp_path / "s.zarr"
    store = SliceStore(str(url), mode="a")
    store.write_case("BraTS19_X_0001_1", np.ones((2, 4, 8, 8), np.float16), None, {"case_id": "BraTS19_X_0001_1"})
    meta_path = url / "cases" / "BraTS19_X_0001_1" / "image" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"] = [{"name": "numcodecs.pickle", "configuration": {}}]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = meta["shape"]
    meta_path.write_text(json.dumps(meta))
    for chunk in (url / "cases" / "BraTS19_X_0001_1" / "image" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises((KeyError, ValueError, TypeError)) as err:
        SliceStore(str(url)).image("BraTS19_X_0001_1")[:]
    assert "pickle" in str(err.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- case ids before paths and keys


UNSAFE = ["../evil", "../../etc/x", "a/b", "/abs", "a\\b", ".hidden", "..", "x\n", "x\x00y", "", "é", "a" * 200]


@pytest.mark.parametrize("case_id", UNSAFE)
def test_unsafe_case_ids_never_become_paths_or_keys(tmp_path, case_id):
    with pytest.raises(InvalidCase, match="unsafe case id"):
        CaseFiles(case_id, {})  # so no task (ingest, infer, evaluate) is ever handed one
    store = SliceStore(str(tmp_path / "s.zarr"), mode="a")
    with pytest.raises(ValueError, match="unsafe case id"):
        store.write_case(case_id, np.ones((1, 4, 8, 8), np.float16), None, {})
    with pytest.raises(ValueError, match="unsafe case id"):
        store.delete_case(case_id)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # nothing written beside the store
    assert not (tmp_path / "s.zarr" / "cases").exists()


def test_registry_names_cannot_escape_the_registry(tmp_path):
    registry = Registry(str(tmp_path / "models"))
    version = registry.create({"status": "complete"})
    for name in ("../x", "a/b", "..", "", "."):
        with pytest.raises(ValueError, match="unsafe registry name"):
            registry.put(version, name, b"x")
        with pytest.raises(ValueError, match="unsafe registry name"):
            registry.get(name, "info.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


# ----------------------------------------------------------------------------- no secrets, loopback


SECRET_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key": (
        r"(?i)(aws_secret_access_key|secret_access_key|s3_secret|FSSPEC_S3_SECRET)"
        r"\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}"
    ),
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GitHub token": r"\b(gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})",
    "Slack token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "Prefect Cloud key": r"\bpnu_[A-Za-z0-9]{36}\b",
    "password in a URL": r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s:@$'\"{}<>]{4,}@",
}


def _repo_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        files = [ROOT / line for line in listed.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        files = [p for p in ROOT.rglob("*") if ".git" not in p.parts and "egg-info" not in str(p)]
    return [p for p in files if p.is_file() and p.stat().st_size < 2_000_000]


def test_no_secrets_in_the_repository():
    found = []
    for path in _repo_files():
        if path.name == ".env" or path.suffix in (".pem", ".key", ".p12") or path.name.startswith("id_rsa"):
            found.append(f"{path.relative_to(ROOT)}: a secrets file is tracked")
            continue
        try:
            text = path.read_text(errors="ignore")
        except OSError:
            continue
        for what, pattern in SECRET_PATTERNS.items():
            for m in re.finditer(pattern, text):
                found.append(f"{path.relative_to(ROOT)}: {what}: {m.group(0)[:12]}…")
    assert not found, found


def test_the_prefect_api_listens_on_loopback_by_default(monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings.models.server.api import ServerAPISettings

    from flows.cli.embedded import EphemeralAPI

    assert ServerAPISettings.model_fields["host"].default == "127.0.0.1"  # `prefect server start`
    launched = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kw: launched.append(args))
    server = SubprocessASGIServer(port=4242)  # Prefect's own temporary API
    server._run_uvicorn_command()
    ours = EphemeralAPI.command(4242)  # what flows/cli/embedded.py starts for every `brats` command
    assert ours == launched[0], "the temporary API must be launched exactly as Prefect launches it"
    assert ours[ours.index("--host") + 1] == "127.0.0.1"
    embedded = (ROOT / "flows" / "cli" / "embedded.py").read_text()
    assert "0.0.0.0" not in embedded


def test_published_service_ports_default_to_loopback():
    compose = ROOT / "deploy" / "docker-compose.yml"
    if not compose.exists():
        pytest.skip("no deploy/docker-compose.yml")
    mappings = re.findall(r"^\s*-\s*\"?([^\"\n]*:\d+:\d+)\"?\s*$", compose.read_text(), re.M)
    assert mappings, "no published ports found"
    for mapping in mappings:
        host = mapping.rsplit(":", 2)[0]
        assert host == "127.0.0.1" or re.fullmatch(r"\$\{[A-Z_]+:-127\.0\.0\.1\}", host), mapping
