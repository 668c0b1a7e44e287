"""The evaluate flow for real: Prefect test API, the small ingested store, an untrained registered model."""

from __future__ import annotations

import json
import shutil

import pytest
from prefect.artifacts import Artifact

from flows.evaluate import evaluate
from storage.cases import discover
from storage.registry import Registry
from storage.store import SliceStore
from tasks.evaluation import split_cases
from tasks.ingest import ingest_case
from tests.helpers import register_model
from unet.metrics import REGIONS

PNG = b"\x89PNG\r\n\x1a\n"


def run(params: dict):
    state = evaluate(**params, return_state=True)
    return state, state.result(raise_on_failure=False)


def test_evaluate_reports_metrics_artifacts_and_saves_them_with_the_model(prefect_api, small_store, tmp_path):
    models = tmp_path / "models"
    store = SliceStore(small_store)
    test_cases = store.split["test"]
    version = register_model(models)
    registry = Registry(str(models))
    registry.update_info(version, split={"train": store.split["train"] + test_cases[:1]})  # a leak to warn about

    state, result = run(dict(store_url=small_store, registry_url=str(models)))
    assert state.is_completed(), state.message
    assert result["version"] == version and result["cases"] == len(test_cases) and result["train_overlap"] == 1
    assert result["truth_from_store_label"] == 0 and result["failed"] == 0

    rows = Artifact.get("evaluate-cases").data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert sorted(r["case"] for r in rows) == sorted(test_cases)
    for r in rows:
        assert r["truth"] == "original seg"
        for region in REGIONS:
            assert 0 <= r[f"dice_{region}"] <= 1 and r[f"hd95_{region}"] >= 0
        assert set(r) == {"case", "truth", *(f"{m}_{g}" for m in ("dice", "hd95") for g in REGIONS)}  # fits a screen
    text = Artifact.get("evaluate-summary").data
    assert "| Dice | mean |" in text and "| HD95 (mm) | median |" in text and "| Specificity | std |" in text
    assert "**Warning:** 1 evaluated case(s) were training cases" in text
    assert text.count("data:image/png;base64,") == 2 and "## Best case" in text and "## Worst case" in text

    info = registry.info(version)
    evaluation = info["evaluation"]
    assert evaluation["split"] == "test" and len(evaluation["per_case"]) == len(test_cases)
    assert set(evaluation["summary"]["dice_WT"]) >= {"mean", "median", "std"}
    assert result["dice_WT"] == round(evaluation["summary"]["dice_WT"]["mean"], 4)
    assert "dice_L4" in evaluation["summary"] and "hd95_ET" in evaluation["summary"]
    assert json.loads(registry.get(version, "evaluation.json"))["per_case"] == evaluation["per_case"]
    for name in ("best", "worst"):
        assert registry.get(version, f"evaluation-test-{name}.png").startswith(PNG)
        assert evaluation["figures"][name]["case"] in test_cases
    assert all(0 <= r[f"sens_{g}"] <= 1 and 0 <= r[f"spec_{g}"] <= 1 for r in evaluation["per_case"] for g in REGIONS)


def test_missing_seg_falls_back_to_the_store_label_with_the_same_metrics(prefect_api, small_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(small_raw, raw)
    url = str(tmp_path / "one.zarr")
    store = SliceStore(url, mode="a")
    store.claim_profile("full")
    case = discover(raw).cases[0]
    ingest_case.fn(case, url, "full")
    store.publish(split={"train": [], "val": [], "test": [case.case_id]})
    models = tmp_path / "models"
    register_model(models)
    params = dict(store_url=url, registry_url=str(models))

    _, first = run(params)
    before = Registry(str(models)).info(Registry(str(models)).best())["evaluation"]["per_case"][0]
    assert before["truth"] == "original seg"
    (raw / case.grade / case.case_id / f"{case.case_id}_seg.nii.gz").unlink()
    state, second = run(params)
    assert state.is_completed() and second["truth_from_store_label"] == 1
    after = Registry(str(models)).info(Registry(str(models)).best())["evaluation"]["per_case"][0]
    assert after["truth"].startswith("store label (") and "is gone" in after["truth"]
    metrics = [k for k in before if k.split("_")[0] in ("dice", "hd95", "sens", "spec")]
    assert len(metrics) == 24 and {k: after[k] for k in metrics} == {k: before[k] for k in metrics}
    text = Artifact.get("evaluate-summary").data
    assert "Note:** 1 case(s) scored against the store label" in text
    # one case: its own figures, no spread over cases, one picture (not the same one as best and worst)
    assert "| Dice | the case |" in text and "median" not in text and "| std |" not in text
    assert text.count("data:image/png;base64,") == 1 and "## Only case" in text


def test_a_model_of_another_profile_is_refused(prefect_api, small_store, tmp_path):
    register_model(tmp_path / "models", profile="tp")
    state, _ = run(dict(store_url=small_store, registry_url=str(tmp_path / "models")))
    assert state.is_failed() and "profile 'tp'" in state.message
    with pytest.raises(ValueError, match="no split 'holdout'"):
        split_cases(SliceStore(small_store), "holdout")
