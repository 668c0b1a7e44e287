"""BEST moves like for like (``storage.versions.promotion``): only to a version that beats it on the
held-out cases both were scored on, above a floor; ``brats models best`` still decides by hand. And a
version's info is typed: today's versions and those older code wrote both read."""

from __future__ import annotations

import json

from flows.cli.main import main as brats
from storage.registry import Registry
from storage.versions import FLOOR, ModelVersion, Score, VersionInfo, promotion
from tasks.versions import promote_if_best

CASES = [f"Brats18_TCIA01_{i}_1" for i in range(10)]


def scored(registry: Registry, measure: str, dice: dict[str, float], **fields) -> str:
    """A complete version scored ``dice[case]`` in every region on these held-out cases."""
    rows = [{"case": c, "dice_WT": d, "dice_TC": d, "dice_ET": d} for c, d in dice.items()]
    version = ModelVersion.open(registry, status="complete", score=Score.of(measure, rows), **fields)
    return version.version


def test_a_short_single_model_never_displaces_a_stronger_ensemble(tmp_path):
    registry = Registry(str(tmp_path / "models"))
    ensemble = scored(registry, "out-of-fold", {c: 0.80 if c != CASES[0] else 0.35 for c in CASES}, kind="ensemble")
    assert promote_if_best.fn(registry.root, ensemble) and registry.best() == ensemble
    # the case: one validation case on which the single model happens to score higher
    single = scored(registry, "validation", {CASES[0]: 0.55})
    promote, why = promotion(ModelVersion(registry, single).info, ModelVersion(registry, ensemble).info)
    assert not promote and "share 1 scored case(s), 3 needed" in why
    assert not promote_if_best.fn(registry.root, single) and registry.best() == ensemble
    # three shared cases, scored worse there than the ensemble's out-of-fold models: stays
    worse = scored(registry, "validation", dict.fromkeys(CASES[1:4], 0.75))
    assert not promote_if_best.fn(registry.root, worse) and registry.best() == ensemble
    # better on the same three cases: like for like, it moves
    better = scored(registry, "validation", dict.fromkeys(CASES[1:4], 0.85))
    assert promote_if_best.fn(registry.root, better) and registry.best() == better
    # the manual override still decides
    assert brats(["models", "best", ensemble, "--registry", registry.root]) == 0 and registry.best() == ensemble


def test_the_floor_and_versions_that_cannot_be_compared(tmp_path, monkeypatch):
    registry = Registry(str(tmp_path / "models"))
    weak = scored(registry, "out-of-fold", dict.fromkeys(CASES, FLOOR - 0.01))
    assert not promote_if_best.fn(registry.root, weak) and registry.best() is None  # below the floor: no BEST
    monkeypatch.setenv("BRATS_BEST_FLOOR", "0.3")
    assert promote_if_best.fn(registry.root, weak) and registry.best() == weak
    monkeypatch.delenv("BRATS_BEST_FLOOR")
    # an old BEST without a per-case score is not compared with: it stays until a person decides
    old = registry.create({"status": "complete", "metrics": {"dice_mean": 0.2}})
    registry.set_best(old)
    strong = scored(registry, "out-of-fold", dict.fromkeys(CASES, 0.9))
    assert not promote_if_best.fn(registry.root, strong) and registry.best() == old
    # unfinished versions never become BEST
    training = scored(registry, "validation", dict.fromkeys(CASES, 0.99))
    ModelVersion(registry, training)._update(status="training")
    assert not promotion(ModelVersion(registry, training).info, None)[0]


def test_models_list_shows_kind_measure_and_cases(tmp_path, capsys):
    registry = Registry(str(tmp_path / "models"))
    ensemble = scored(registry, "out-of-fold", dict.fromkeys(CASES, 0.8), kind="ensemble", members=["a", "b"])
    promote_if_best.fn(registry.root, ensemble)
    capsys.readouterr()
    assert brats(["models", "list", "--registry", registry.root]) == 0
    head, row = capsys.readouterr().out.splitlines()
    assert head.split()[:6] == ["version", "created", "kind", "status", "trained", "network"]
    assert row.startswith("*") and "ensemble" in row and "2 folds" in row and "out-of-fold  10" in row


def test_a_version_written_by_older_code_still_reads(tmp_path):
    """info.json as the code before typed versions wrote it (package versions under "versions")."""
    registry = Registry(str(tmp_path / "models"))
    old = {
        "status": "complete",
        "model": {"base_channels": 16, "depth": 4, "padding": "same"},
        "profile": "tp",
        "store": "s.zarr",
        "store_fingerprint": "29e28584ce5c5b1b",
        "split": {"train": CASES[:8], "val": CASES[8:]},
        "fold": None,
        "train_config": {"epochs": 12},
        "metrics": {"dice_mean": 0.7},
        "history": [],
        "versions": {"python": "3.11.2", "torch": "2.13.0"},
        "attempts": 1,
        "postprocess": {"min_island_ml": 0.5, "et_min_ml": 0.1},
        "a_key_of_the_future": 1,
    }
    version = registry.create(old)
    info = ModelVersion(registry, version).info
    assert isinstance(info, VersionInfo) and info.packages["torch"] == "2.13.0" and info.kind == "model"
    assert info.split["val"] == CASES[8:] and info.postprocess["min_island_ml"] == 0.5 and info.score is None
    ModelVersion(registry, version).record_evaluation({"split": "test"})  # a typed write keeps what it does not know
    kept = json.loads(registry.get(version, "info.json"))
    assert (
        kept["a_key_of_the_future"] == 1
        and kept["evaluation"] == {"split": "test"}
        and kept["metrics"] == old["metrics"]
    )
