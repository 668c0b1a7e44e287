"""K-fold cross-validation as a flow: fold models by patient, out-of-fold scores, the ensemble version."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from prefect.artifacts import Artifact

from flows.cli.main import main as brats
from flows.evaluate import evaluate
from storage.registry import Registry
from storage.split import patient_of
from storage.store import SliceStore
from tasks.versions import fold_split
from unet.checkpoint import load_model
from unet.config import TrainConfig
from unet.ensemble import Ensemble
from unet.model import UNetConfig

NETWORK = UNetConfig(base_channels=4, depth=2, padding="same", context=1)
TRAINING = TrainConfig(
    epochs=2, batch_size=8, max_steps_per_epoch=2, workers=0, lr=3e-3, folds=3, keep="last", validate_every=2
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_folds_are_disjoint_deterministic_and_cover_the_cases_outside_the_test_split(small_store):
    store = SliceStore(small_store)
    cases = sorted(store.split["train"] + store.split["val"])
    three = TrainConfig(folds=3)
    folds = [fold_split(store, three, i) for i in range(3)]
    assert folds == [fold_split(store, three, i) for i in range(3)]
    assert sorted(c for f in folds for c in f["val"]) == cases  # every case validated exactly once
    for f in folds:
        assert sorted(f["train"] + f["val"]) == cases and not set(f["train"]) & set(f["val"])
        assert not {patient_of(c) for c in f["train"]} & {patient_of(c) for c in f["val"]}
        assert not set(f["train"] + f["val"]) & set(store.split["test"])  # the test split stays held out
    with pytest.raises(ValueError, match="fold 3 of 3"):
        fold_split(store, three, 3)


def test_brats_train_folds_registers_an_ensemble_scored_out_of_fold(
    prefect_api, small_store, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("BRATS_BEST_FLOOR", "0")  # the floor (mean of WT, TC, ET) is for real models: this one
    # learns the whole tumour in 12 epochs, not yet its core
    models = str(tmp_path / "models")
    args = ["train", "--store", small_store, "--registry", models, "--folds", "3", "--epochs", "12"]
    args += ["--base-channels", "8", "--depth", "3", "--padding", "same", "--context", "1", "--batch-size", "8"]
    args += ["--class-weight-power", "0.5", "--oversample-tumour", "2", "--lr", "3e-3"]
    args += ["--workers", "0", "--keep", "last", "--validate-every", "12"]
    assert brats(args) == 0
    out = json.loads(capsys.readouterr().out)
    registry = Registry(models)
    version, members = out["version"], out["members"]
    info = registry.info(version)
    store = SliceStore(small_store)
    cases = sorted(store.split["train"] + store.split["val"])

    # K fold versions, each validated on its own fold, and the ensemble of them, which is now BEST
    assert info["kind"] == "ensemble" and info["members"] == members and len(members) == 3
    assert registry.best() == version and out["best"] is True
    vals = [registry.info(m)["split"]["val"] for m in members]
    assert sorted(sum(vals, [])) == cases and info["split"]["folds"] == vals
    for i, m in enumerate(members):
        member = registry.info(m)
        assert member["fold"] == i and member["status"] == "complete" and member["model"]["context"] == 1
        assert [r["case"] for r in member["out_of_fold"]] == member["split"]["val"]
        for case in member["split"]["val"]:  # its out-of-fold segmentation, kept for the ensemble's choice
            with np.load(io.BytesIO(registry.get(m, f"oof-{case}.npz"))) as f:
                assert f["labels"].shape == tuple(store.attrs(case)["shape"])

    # every case scored once, by the fold model that never saw it; post-processing chosen on all of them
    cv = info["cv"]
    assert sorted(r["case"] for r in cv["per_case"]) == cases
    assert {r["case"]: r["fold"] for r in cv["per_case"]} == {c: i for i, v in enumerate(vals) for c in v}
    assert info["postprocess_choice"]["on"] == "out-of-fold" and info["postprocess_choice"]["cases"] == len(cases)
    assert info["metrics"]["dice_WT"] == pytest.approx(np.mean([r["dice_WT"] for r in cv["per_case"]]), abs=1e-4)
    assert info["metrics"]["dice_WT"] > 0.25  # the folds learned: an untrained network scores about 0.06 here
    assert [f["cases"] for f in cv["per_fold"]] == [len(v) for v in vals]
    summary = Artifact.get("cv-summary").data
    worst = min(cv["per_case"], key=lambda r: min(r["dice_WT"], r["dice_TC"], r["dice_ET"]))
    assert version in summary and f"Worst cases: `{worst['case']}`" in summary

    # the ensemble is one model to evaluation and inference: the mean of its members
    model, _ = load_model(registry, version)
    assert isinstance(model, Ensemble) and len(model.members) == 3
    result = evaluate(small_store, version, models, "test")
    assert result["cases"] == len(store.split["test"]) and result["dice_WT"] > 0.25


def test_a_fold_needs_folds():
    from flows.train import train

    state = train("unused", "unused", NETWORK, TRAINING.model_copy(update={"folds": 0}), fold=1, return_state=True)
    assert state.is_failed() and "training.folds is 0" in state.message


def test_the_members_take_turns_at_the_augmentation(prefect_api, small_store, tmp_path, monkeypatch):
    """``member_augment``: fold i's model trains with the i-th augmentation in turn, its version says which,
    and the run started again reuses each member (each fold's run is the same run as before)."""
    from flows.train import train

    monkeypatch.setenv("BRATS_BEST_FLOOR", "0")
    models = str(tmp_path / "models")
    training = TRAINING.model_copy(update={"member_augment": ("strong", "gin")})
    out = train(small_store, models, NETWORK, training)
    registry = Registry(models)
    assert [registry.info(m)["train_config"]["augment"] for m in out["members"]] == ["strong", "gin", "strong"]
    ensemble = registry.info(out["version"])["train_config"]
    assert ensemble["member_augment"] == ["strong", "gin"] and ensemble["augment"] == TRAINING.augment
    assert train(small_store, models, NETWORK, training)["members"] == out["members"]


def test_the_members_benchmark_scores_each_run_and_each_pair_on_the_same_folds(prefect_api, small_store, tmp_path):
    """``benchmarks/members.py`` on two cross-validations laid out as ``benchmarks/real.py`` leaves them:
    each run alone scores exactly what its fold models recorded out of fold, and the pair is an ensemble."""
    import subprocess
    import sys
    from pathlib import Path

    from flows.train import train

    records = {}
    for name, lr in (("a", 3e-3), ("b", 1e-3)):  # same folds (same seed), models trained otherwise
        run = tmp_path / name
        out = train(small_store, str(run / "models"), NETWORK, TRAINING.model_copy(update={"lr": lr, "folds": 2}))
        (run / "slices-x.zarr").symlink_to(small_store)
        record = {"postprocess": {"postprocess": {}}, "per_case": []}  # no post-processing: the raw out-of-fold
        (run / "real-benchmark.json").write_text(json.dumps({"cpu": record}))
        registry = Registry(str(run / "models"))
        records[name] = {r["case"]: r for m in out["members"] for r in registry.info(m)["out_of_fold"]}
    script = Path(__file__).parents[1] / "benchmarks" / "members.py"
    args = [sys.executable, script, tmp_path / "a" / "real-benchmark.json", tmp_path / "b" / "real-benchmark.json"]
    done = subprocess.run([*map(str, args), "--out", str(tmp_path / "scores.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores) == {"A", "B", "A+B"} and set(scores["A"]) == set(records["a"])
    for case, recorded in records["a"].items():
        assert scores["A"][case]["dice_WT"] == pytest.approx(recorded["dice_WT"], abs=1e-3)
        assert scores["B"][case]["dice_WT"] == pytest.approx(records["b"][case]["dice_WT"], abs=1e-3)
    assert any(scores["A+B"][c] != scores["A"][c] and scores["A+B"][c] != scores["B"][c] for c in records["a"])
    assert [line.split()[0] for line in done.stdout.splitlines()[-3:]] == ["A", "B", "A+B"]
