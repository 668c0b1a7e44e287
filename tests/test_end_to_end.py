"""The whole pipeline through the ``brats`` command: ingest -> short train -> evaluate -> infer.

Small synthetic data and a small network trained briefly, so it runs in the normal suite; the
plumbing between the stages is checked, and that the model learned (far above an untrained one).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from flows.cli.main import main
from storage.registry import Registry
from storage.store import SliceStore
from storage.synth import write_dataset
from tests.conftest import SMALL


def brats(capsys, *argv: str) -> dict:
    """Run one ``brats`` command; exit code 0 and its JSON result, or the test fails."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, f"brats {argv[0]} exited {code}: {err[-2000:]}"
    return json.loads(out[out.index("{") :])


@pytest.mark.slow
def test_ingest_train_evaluate_infer(prefect_api, small_raw, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BRATS_BEST_FLOOR", "0.3")  # 40 s of training on 3 tiny cases: a lower bar for BEST
    store, models, out = tmp_path / "slices.zarr", tmp_path / "models", tmp_path / "out"
    new = tmp_path / "new"
    write_dataset(new, cases=2, seed=99, shape=SMALL, with_seg=False, prefix="BraTS19_NEW")

    ingested = brats(
        capsys, "ingest", small_raw, "--store", store, "--workers", "1", "--split-ratios", "0.5", "0.25", "0.25"
    )
    assert ingested["ingested"] == 6

    # the cpu recipe, one small model: enough steps to learn the synthetic tumours
    train = ["train", "--store", store, "--registry", models, "--recipe", "cpu", "--folds", "0", "--epochs", "15"]
    train += ["--base-channels", "8", "--depth", "3", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    trained = brats(capsys, *train)
    registry = Registry(str(models))
    version = registry.best()
    assert version is not None and trained["best"] is True
    assert registry.info(version)["profile"] == "full"

    evaluated = brats(capsys, "evaluate", "--store", store, "--registry", models, "--device", "cpu")
    test_cases = SliceStore(str(store)).split["test"]
    assert evaluated["version"] == version and evaluated["cases"] == len(test_cases)
    assert evaluated["train_overlap"] == 0 and evaluated["truth_from_store_label"] == 0
    assert evaluated["dice_WT"] >= 0.3  # it learned: 45 steps of it score about 0.06 here
    assert [r["case"] for r in registry.info(version)["evaluation"]["per_case"]] == sorted(test_cases)

    inferred = brats(capsys, "infer", new, "--out", out, "--registry", models, "--tta")
    assert inferred["written"] == 2 and inferred["version"] == version and inferred["tta"] is True
    for case in ("BraTS19_NEW_0001_1", "BraTS19_NEW_0002_1"):
        seg = nib.load(out / f"{case}_seg.nii.gz")
        flair = next(new.glob(f"*/{case}/{case}_flair.nii.gz"))
        assert seg.shape == SMALL and np.array_equal(seg.affine, nib.load(flair).affine)
        assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1, 2, 4}
        assert json.loads((out / f"{case}.json").read_text())["model_version"] == version
