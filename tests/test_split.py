"""Splits and folds: by patient, deterministic, stratified by grade, every case exactly once."""

from __future__ import annotations

import pytest

from storage.split import make_folds, make_split, patient_of, site_of


def test_split_is_deterministic_stratified_and_by_patient():
    grades = {f"H{i:02d}": "HGG" for i in range(14)} | {f"L{i:02d}": "LGG" for i in range(6)}
    a, b = (
        make_split(grades, (0.7, 0.15, 0.15), seed=1),
        make_split(dict(reversed(grades.items())), (0.7, 0.15, 0.15), seed=1),
    )
    assert a == b
    assert sorted(sum(a.values(), [])) == sorted(grades)  # every case exactly once
    for part, n_h, n_l in (("train", 10, 4), ("val", 2, 1), ("test", 2, 1)):
        assert sum(c.startswith("H") for c in a[part]) == n_h and sum(c.startswith("L") for c in a[part]) == n_l
    assert make_split(grades, seed=2) != a
    with pytest.raises(ValueError, match="three non-negative"):
        make_split(grades, (1, -1, 0))


@pytest.mark.parametrize("hgg,lgg", [(4, 2), (2, 1), (1, 2), (5, 0), (3, 3)])
def test_few_cases_still_give_a_validation_and_a_test_case(hgg, lgg):
    """Rounding per grade alone gave 4 HGG + 2 LGG a split of 5/1/0: nothing to evaluate on."""
    grades = {f"H{i}": "HGG" for i in range(hgg)} | {f"L{i}": "LGG" for i in range(lgg)}
    split = make_split(grades)
    assert len(split["val"]) >= 1 and len(split["test"]) >= 1 and len(split["train"]) >= 1
    assert sorted(sum(split.values(), [])) == sorted(grades)
    assert make_split(grades, (0.8, 0.2, 0.0))["test"] == []  # a share of 0 stays 0


def test_patient_of_strips_the_time_point_only_where_the_naming_has_one():
    assert patient_of("Brats18_TCIA01_131_1") == patient_of("BraTS19_TCIA01_131_2") == "TCIA01_131"
    assert patient_of("Brats18_2013_2_1") == "2013_2"
    assert patient_of("BraTS-GLI-00012-001") == patient_of("BraTS-GLI-00012-000") == "BraTS-GLI-00012"
    assert patient_of("BraTS2021_00006") == "BraTS2021_00006"
    assert patient_of("BraTS20_Training_001") == "BraTS20_Training_001"


def test_scans_of_one_patient_stay_together():
    grades = {f"Brats18_TCIA01_{p}_{t}": "HGG" for p in range(8) for t in (1, 2)}
    split = make_split(grades, seed=3)
    for part in split.values():
        for case in part:
            assert {patient_of(c) for c in part} >= {patient_of(case)}
            twin = case[:-1] + ("2" if case.endswith("1") else "1")
            assert twin in part, (case, split)
    folds = make_folds(grades, 4, seed=3)
    assert sorted(sum(folds, [])) == sorted(grades)
    for fold in folds:
        assert len(fold) == 4 and all(c[:-1] + "1" in fold and c[:-1] + "2" in fold for c in fold)


def test_folds_are_deterministic_stratified_and_patient_disjoint():
    grades = {f"H{i:02d}": "HGG" for i in range(13)} | {f"L{i:02d}": "LGG" for i in range(8)}
    folds = make_folds(grades, 5, seed=0)
    assert folds == make_folds(dict(reversed(grades.items())), 5, seed=0)
    assert sorted(sum(folds, [])) == sorted(grades)  # every case in exactly one fold
    assert sorted(map(len, folds)) == [4, 4, 4, 4, 5]
    for fold in folds:  # stratified: each fold holds 2 or 3 HGG and 1 or 2 LGG
        assert sum(c.startswith("H") for c in fold) in (2, 3) and sum(c.startswith("L") for c in fold) in (1, 2)
    assert make_folds(grades, 5, seed=1) != folds
    with pytest.raises(ValueError, match="3 folds need"):
        make_folds({"a": None, "b": None}, 3)


REAL_IDS = [f"Brats18_2013_{i}_1" for i in (2, 3, 4, 5, 11)] + [f"Brats18_CBICA_A{c}_1" for c in "BCDE"]
REAL_IDS += [f"Brats18_TCIA01_{i}_1" for i in (131, 147, 180, 425)] + [f"Brats18_TCIA02_{i}_1" for i in (1, 2, 3)]
REAL_IDS += [f"Brats18_TCIA10_{i}_1" for i in (628, 637, 639)] + ["Brats18_TCIA03_121_1", "Brats18_TCIA13_623_1"]


def test_site_folds_keep_each_institution_whole_and_are_deterministic():
    assert site_of("Brats18_TCIA01_131_1") == "TCIA01" and site_of("BraTS19_2013_11_1") == "2013"
    assert site_of("BraTS-GLI-00000-001") == "BraTS-GLI-00000"  # no institution in the id: the patient
    grades = {c: "HGG" for c in REAL_IDS}
    folds = make_folds(grades, 5, by="site")
    assert folds == make_folds(dict(reversed(grades.items())), 5, seed=7, by="site")  # order and seed do not matter
    assert sorted(c for f in folds for c in f) == sorted(REAL_IDS)
    sites = [{site_of(c) for c in f} for f in folds]
    for i, a in enumerate(sites):  # site-disjoint: no institution in two folds
        assert all(not a & b for b in sites[i + 1 :])
    assert sites == [{"2013"}, {"CBICA"}, {"TCIA01"}, {"TCIA02", "TCIA03"}, {"TCIA10", "TCIA13"}]
    with pytest.raises(ValueError, match="8 folds by site need .* 8 sites; there are 7"):
        make_folds(grades, 8, by="site")
