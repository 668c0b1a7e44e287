"""Which cases train, validate and test: by patient, deterministic, stratified by grade.

* ``make_split``: train / val / test shares of the labelled cases (stored in the slice store).
* ``make_folds``: K folds of the cases for cross-validation; fold i validates the model trained on
  the others, so every case is scored once by a model that never saw it. ``by="site"`` keeps each
  institution in one fold (leave-one-institution-out, small sites pooled): the model that scores a
  case never saw a scan from its hospital, as a new hospital's scans will meet it.

Both work on *patients*, not cases: the scans of one patient (``patient_of``: BraTS ids carry the
institution and patient, and a time point) always land together, so a model is never validated on
another scan of a patient it trained on. The order within a grade is a hash of (seed, patient), so it
does not depend on which other cases exist.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

import numpy as np

# BraTS 2017-2019: Brats18_TCIA01_131_1 (institution, patient, time point); 2023+: BraTS-GLI-00000-000
_TIMEPOINT = (
    re.compile(r"^(?:Brats|BraTS)1[7-9]_(?P<patient>[A-Za-z0-9]+_[A-Za-z0-9]+)_\d+$"),
    re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-\d+$"),
)


def site_of(case_id: str) -> str:
    """The institution a case comes from, read from its BraTS id (``Brats18_TCIA01_131_1`` -> ``TCIA01``,
    ``Brats18_2013_11_1`` -> ``2013``); an id without one (BraTS 2021+, other names) is a site of its own
    patient."""
    patient = patient_of(case_id)
    return patient.split("_", 1)[0] if patient != case_id and "_" in patient else patient


def patient_of(case_id: str) -> str:
    """The patient a case id belongs to: the id without its time point where the naming has one
    (``Brats18_TCIA01_131_1`` and ``BraTS19_TCIA01_131_1`` -> ``TCIA01_131``); else the id itself."""
    for pattern in _TIMEPOINT:
        if m := pattern.match(case_id):
            return m["patient"]
    return case_id


def _patients_by_grade(grades: dict[str, str | None], seed: int) -> dict[str, list[list[str]]]:
    """{grade: [the cases of one patient, ...] in hash order}; a patient's grade is its first case's."""
    patients: dict[str, list[str]] = {}
    for case_id in sorted(grades):
        patients.setdefault(patient_of(case_id), []).append(case_id)
    by_grade: dict[str, list[list[str]]] = {}
    for patient in sorted(patients, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()):
        cases = patients[patient]
        by_grade.setdefault(grades[cases[0]] or "unknown", []).append(cases)
    return by_grade


def make_split(
    grades: dict[str, str | None], ratios: Iterable[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[str]]:
    """Train/val/test split of labelled cases ({case id: grade or None}) by patient.

    Within each grade, patients are cut by largest-remainder rounding of the ratios. Rounding per
    grade can leave val or test empty with few patients; whenever there are 3 or more, each of them
    gets at least one (taken from the end of the largest grade's train patients), as long as its
    ratio is not 0.
    """
    names = ("train", "val", "test")
    ratios = np.asarray(list(ratios), dtype=float)
    if ratios.shape != (3,) or (ratios < 0).any() or ratios.sum() <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers, got {ratios.tolist()}")
    ratios = ratios / ratios.sum()
    split: dict[str, list[list[str]]] = {n: [] for n in names}
    trains: dict[str, list[list[str]]] = {}
    by_grade = _patients_by_grade(grades, seed)
    for grade in sorted(by_grade):
        patients = by_grade[grade]
        exact = ratios * len(patients)
        counts = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - counts), kind="stable")[: len(patients) - counts.sum()]:
            counts[i] += 1
        start = 0
        for name, n in zip(names, counts):
            split[name] += patients[start : start + n]
            start += n
        trains[grade] = patients[: counts[0]]
    for name, ratio in zip(names[1:], ratios[1:]):
        if not split[name] and ratio > 0 and sum(map(len, by_grade.values())) >= 3 and len(split["train"]) > 1:
            moved = trains[max(sorted(trains), key=lambda g: len(trains[g]))].pop()
            split["train"].remove(moved)
            split[name].append(moved)
    return {n: sorted(c for patient in v for c in patient) for n, v in split.items()}


def make_folds(grades: dict[str, str | None], k: int, seed: int = 0, by: str = "patient") -> list[list[str]]:
    """``k`` folds of the cases ({case id: grade or None}) by patient, stratified by grade: each grade's
    patients in hash order are dealt to the folds in turn, continuing where the last grade stopped, so
    fold sizes differ by one patient at most. ``by="site"``: ``site_folds``. Raises ValueError with
    fewer patients (or sites) than folds."""
    if by == "site":
        return site_folds(list(grades), k)
    if by != "patient":
        raise ValueError(f"folds by {by!r}: choose patient or site")
    by_grade = _patients_by_grade(grades, seed)
    patients = [p for grade in sorted(by_grade) for p in by_grade[grade]]
    if k < 2 or len(patients) < k:
        raise ValueError(f"{k} folds need at least 2 folds and {k} patients; there are {len(patients)}")
    folds: list[list[str]] = [[] for _ in range(k)]
    for i, cases in enumerate(patients):
        folds[i % k] += cases
    return [sorted(f) for f in folds]


def site_folds(cases: list[str], k: int) -> list[list[str]]:
    """``k`` folds with every institution (``site_of``) whole in one fold: sites, largest first (ties by
    name), each go to the fold with the fewest cases so far (ties: the lower fold), so the big sites
    are folds of their own and the small ones are pooled. Deterministic: no seed is needed."""
    sites: dict[str, list[str]] = {}
    for case_id in sorted(cases):
        sites.setdefault(site_of(case_id), []).append(case_id)
    if k < 2 or len(sites) < k:
        raise ValueError(f"{k} folds by site need at least 2 folds and {k} sites; there are {len(sites)}")
    folds: list[list[str]] = [[] for _ in range(k)]
    for site in sorted(sites, key=lambda s: (-len(sites[s]), s)):
        min(folds, key=len).extend(sites[site])  # min() takes the first of equals: the lower fold
    return [sorted(f) for f in folds]
