"""Shared fixtures: one Prefect test API for the whole session, the real BraTS case, small synthetic data.

PREFECT_HOME goes to a temp dir before Prefect is imported, so runs never share state with the
user's own Prefect or with another test session, and analytics stay off (no network).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="brats-test-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("BRATS_REAL_DATA", ROOT / "tests" / "data"))  # one real case, committed
SMALL = (64, 64, 40)  # small synthetic grid: fast, still brain + tumour on many slices


def child_env(root: Path = ROOT, **extra: str) -> dict:
    """The environment for a child Python process: this one's, with ``root`` put before its
    PYTHONPATH (extended, not replaced: the packages it names stay importable) and ``extra``."""
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def rewrite_nifti(path, data, affine=None, dtype=None) -> None:
    """Rewrite a NIfTI file in place with new voxels (and optionally affine or dtype): a bad-input maker."""
    import nibabel as nib

    img = nib.load(path)
    out = nib.Nifti1Image(
        data if dtype is None else data.astype(dtype), img.affine if affine is None else affine, img.header
    )
    if dtype is not None:
        out.set_data_dtype(dtype)
    nib.save(out, path)


@pytest.fixture(scope="module")
def one_thread():
    """The test machine's cores are shared: one intra-op thread is faster here, and deterministic
    (modules that train: ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (ephemeral, SQLite) for the whole session, visible to Dask worker processes too."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url  # Dask workers are separate processes
        yield url
        os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def real_case() -> Path:
    case = REAL / "Brats18_2013_2_1"
    assert case.is_dir(), f"the real BraTS case is missing at {case} (set BRATS_REAL_DATA)"
    return case


@pytest.fixture(scope="session")
def small_raw(tmp_path_factory) -> Path:
    """Six small synthetic cases in the BraTS 2019 layout (read-only for tests: copy before changing)."""
    from storage.synth import write_dataset

    out = tmp_path_factory.mktemp("raw")
    write_dataset(out, cases=6, seed=7, shape=SMALL)
    return out


@pytest.fixture(scope="session")
def small_store(small_raw, tmp_path_factory) -> str:
    """The small synthetic cases ingested (without Prefect) into a 'full'-profile store with a split."""
    from storage.cases import discover
    from storage.store import SliceStore
    from tasks.ingest import ingest_case

    url = str(tmp_path_factory.mktemp("store") / "slices.zarr")
    store = SliceStore(url, mode="a")
    store.claim_profile("full")
    for case in discover(small_raw).cases:
        ingest_case.fn(case, url, "full")
    store.publish((0.5, 0.25, 0.25))
    return url
