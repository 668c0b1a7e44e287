"""The quality estimate (``unet.quality``): what it is built from, its calibration and review rule, and
that a deliberately broken scan is flagged while the same scan intact is not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from unet import quality
from unet.predict import Prediction
from unet.quality import Evidence

REAL = Path(__file__).parent / "data" / "Brats18_2013_2_1"
MODELS, VERSION = Path(__file__).parent / "data" / "models", "v20261201-020822-ed23"  # real cases, never this one


def views(*probs: list[float]) -> torch.Tensor:
    """(V, 1, 4, 1, W): per view, a row of pixels with these probabilities of ET (the rest background)."""
    p = torch.tensor(probs, dtype=torch.float32)[:, None, None, None, :]
    return torch.cat([1 - p, torch.zeros_like(p), torch.zeros_like(p), p], dim=2)


def test_evidence_tells_sure_from_unsure_and_agreeing_from_disagreeing():
    inside = torch.ones((1, 1, 400), dtype=torch.bool)
    sure = views([1.0] * 200 + [0.0] * 200)
    e = Evidence()
    e.add(sure, [sure.argmax(2), sure.argmax(2)], inside)
    assert e.features()["ET"] == {"Q": 1.0, "A": 1.0, "D": 1.0}
    hovering = views([0.9] * 100 + [0.6] * 100 + [0.4] * 100 + [0.0] * 100)  # a wide rim near the decision
    mirrored = views([0.9] * 100 + [0.0] * 300).argmax(2)  # the mirror keeps only the sure core
    e = Evidence()
    e.add(hovering, [hovering.argmax(2), mirrored], inside)
    f = e.features()["ET"]
    assert f["Q"] < 0.7 and f["A"] < 0.75 and f["D"] == 1.0
    members = torch.cat([views([1.0] * 200 + [0.0] * 200), views([0.0] * 200 + [1.0] * 200)])  # two that disagree
    e = Evidence()
    e.add(members, [members.argmax(2)], inside)
    assert e.features()["ET"]["D"] < 0.7 and e.features()["WT"]["D"] < 0.7
    assert Evidence().features()["WT"] == {"Q": 1.0, "A": 1.0, "D": 1.0}  # nothing predicted: nothing doubted


def cases(n: int, seed: int = 0) -> list[dict]:
    """Cases whose true Dice is a noisy line of their score, a few of them bad."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = rng.uniform(0.6, 0.84) if rng.uniform() < 0.2 else rng.uniform(0.84, 1.0)  # a fifth of them bad
        f = {r: {"Q": s, "A": s, "D": 1.0} for r in ("WT", "TC", "ET")}
        dice = {r: float(np.clip(1.6 * s - 0.65 + rng.normal(0, 0.03), 0, 1)) for r in ("WT", "TC", "ET")}
        out.append({"features": f, "dice": dice, "WT_ml": 60.0, "volumes_ml": {"WT": 60.0, "TC": 20.0, "ET": 8.0}})
    return out


def test_calibration_review_rule_and_held_out_figures():
    train = cases(40)
    calibration = quality.fit(train)
    assert calibration["lines"]["WT"]["b"] == pytest.approx(1.6, abs=0.1)
    assert calibration["lines"]["WT"]["a"] == pytest.approx(-0.65, abs=0.1)
    rule = calibration["rule"]
    estimates = [quality.estimate(c["features"], c["volumes_ml"], calibration) for c in train]
    flagged = [e["WT"] < rule["wt"] or e["TC"] < rule["tc"] for e in estimates]
    bad = [c["dice"]["WT"] < 0.7 or c["dice"]["TC"] < 0.5 for c in train]
    assert sum(flagged) <= quality.MAX_FLAGGED * len(train)
    assert sum(f and b for f, b in zip(flagged, bad)) >= 0.75 * sum(bad) > 0
    held = quality.held_out(train)
    figures = quality.agreement(train, held)
    assert figures["WT"]["spearman"] > 0.9 and figures["WT"]["mae"] < 0.05
    assert figures["bad_flagged"] >= 0.75 * figures["bad"]
    assert quality.estimate(train[0]["features"], train[0]["volumes_ml"], None)["WT"] == pytest.approx(
        train[0]["features"]["WT"]["Q"], abs=1e-4
    )
    reasons = quality.review(
        {"WT": 0.9, "TC": 0.9, "ET": 0.9}, train[0]["features"], {"WT": 400.0, "TC": 1, "ET": 1}, calibration
    )
    assert reasons == ["whole tumour of 400 ml, far from the 60-60 ml of the training cases"]
    assert quality.review({"WT": 1, "TC": 1, "ET": 1}, train[0]["features"], {"WT": 0.0}, calibration)[0] == (
        "no tumour found"
    )


def test_a_small_enhancing_tumour_is_trusted_less_than_a_large_one_as_sure():
    """The small-structure prior: the same sureness on 0.5 ml of ET estimates a lower Dice than on
    20 ml (a third of the score), WT and TC are untouched, and a calibration fitted before the prior
    (no ``small_ml``) is applied to the plain score it was fitted on."""
    features = {r: {"Q": 0.9, "A": 0.9, "D": 1.0} for r in ("WT", "TC", "ET")}
    small, large = {"WT": 60.0, "TC": 20.0, "ET": 0.5}, {"WT": 60.0, "TC": 20.0, "ET": 20.0}
    identity = {"lines": {r: {"a": 0.0, "b": 1.0} for r in ("WT", "TC", "ET")}, "small_ml": quality.SMALL_ML}
    assert quality.estimate(features, small, identity)["ET"] == pytest.approx(0.9 * 0.5 / 1.5, abs=1e-3)
    assert quality.estimate(features, large, identity)["ET"] == pytest.approx(0.9 * 20 / 21, abs=1e-3)
    assert quality.estimate(features, small, identity)["WT"] == quality.estimate(features, large, identity)["WT"] == 0.9
    before = {"lines": identity["lines"]}  # a version calibrated by an earlier release
    assert quality.estimate(features, small, before)["ET"] == 0.9
    # fitted on cases whose ET Dice falls with their ET volume, the prior is kept in the calibration
    train = cases(30)
    for c, ml in zip(train, np.geomspace(0.2, 40, len(train))):
        c["volumes_ml"] = {**c["volumes_ml"], "ET": float(ml)}
        c["dice"]["ET"] = float(0.9 * ml / (ml + 1.0))
        c["features"]["ET"] = {"Q": 0.9, "A": 0.9, "D": 1.0}
    calibration = quality.fit(train)
    assert calibration["small_ml"] == {"ET": 1.0}
    figures = quality.agreement(train, quality.held_out(train))
    assert figures["ET"]["mae"] < 0.02 and figures["ET"]["spearman"] > 0.95


@pytest.mark.slow
def test_a_scan_with_a_modality_replaced_by_noise_is_flagged_and_the_intact_one_is_not(prefect_api, tmp_path):
    from prefect.artifacts import Artifact

    from flows.infer import infer
    from flows.review import review

    inbox = tmp_path / "inbox"
    good = inbox / REAL.name
    shutil.copytree(REAL, good, ignore=shutil.ignore_patterns("*seg*"))
    broken = inbox / "Brats18_2013_2_9"
    shutil.copytree(good, broken)
    for f in broken.iterdir():
        f.rename(broken / f.name.replace(good.name, broken.name))
    flair = broken / f"{broken.name}_flair.nii.gz"
    img = nib.load(flair)
    a = np.asanyarray(img.dataobj)
    brain = a[a > 0]
    noise = np.where(a > 0, np.random.default_rng(0).normal(brain.mean(), brain.std(), a.shape), 0)
    nib.save(nib.Nifti1Image(noise.astype(a.dtype), img.affine, img.header), flair)

    out = tmp_path / "out"
    summary = infer([str(inbox)], str(out), VERSION, str(MODELS), prediction=Prediction(device="cpu"))
    assert summary["written"] == 2 and summary["review"] == 1 and summary["review_cases"] == [broken.name]
    page = Artifact.get("infer-summary").data
    assert "To review: 1 of 2" in page and page.index(broken.name) < page.index(good.name)
    assert page.count("data:image/png;base64,") == 2  # each case's picture, the flagged one first
    intact, noisy = (json.loads((out / f"{c}.json").read_text()) for c in (good.name, broken.name))
    for r in (intact, noisy):
        assert set(r["quality"]) == {"WT", "TC", "ET"} and all(0 <= v <= 1 for v in r["quality"].values())
    assert intact["review"] is False and intact["review_reasons"] == []
    assert noisy["review"] is True and any(
        reason.startswith("whole tumour uncertain") for reason in noisy["review_reasons"]
    )
    assert noisy["quality"]["WT"] < intact["quality"]["WT"] - 0.05

    # what the brats.segmentation.review automation runs: the case on the folder's review list, once
    for _ in range(2):
        review(broken.name, str(out))
    listed = (out / "review.csv").read_text().splitlines()
    assert len(listed) == 2 and listed[1].startswith(f"{broken.name},") and "whole tumour uncertain" in listed[1]


def benchmark_run(root: Path, seed: int) -> tuple[Path, list[dict]]:
    """A ``benchmarks/real.py`` record of 21 out-of-fold cases, and each case's kept segmentation:
    a 1000-voxel enhancing tumour, of which run 1 keeps a share that falls with the case's true Dice."""
    rows = []
    for i, c in enumerate(cases(21, seed=0)):
        case = f"case{i:02d}"
        rows.append(
            {"case": case, "features": c["features"], "truth_WT_ml": c["WT_ml"], "volumes_ml": c["volumes_ml"]}
            | {f"dice_{r}": d for r, d in c["dice"].items()}
            | {f"est_{r}": c["features"][r]["Q"] for r in c["dice"]}
        )
        labels = np.zeros((10, 10, 10), dtype=np.uint8)
        labels.reshape(-1)[: 1000 if seed == 0 else int(1000 * c["dice"]["WT"]) + 1] = 4
        (root / "models" / f"v{i % 5}").mkdir(parents=True, exist_ok=True)
        np.savez_compressed(root / "models" / f"v{i % 5}" / f"oof-{case}.npz", labels=labels)
    (root / "real-benchmark.json").write_text(json.dumps({"cpu": {"per_case": rows}}))
    return root / "real-benchmark.json", rows


def test_the_estimate_benchmark_pools_runs_and_ranks_member_agreement(tmp_path):
    import subprocess
    import sys

    a, rows = benchmark_run(tmp_path / "a", 0)
    b, _ = benchmark_run(tmp_path / "b", 1)
    script = Path(__file__).parents[1] / "benchmarks" / "estimate.py"
    run = lambda *args: subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True)  # noqa: E731
    out = run(a, b)
    assert out.returncode == 0, out.stderr
    figures = quality.agreement(quality.cases_of(rows), quality.held_out(quality.cases_of(rows)))
    mean_row = next(line for line in out.stdout.splitlines() if line.startswith("mean of 2 runs"))
    assert mean_row.split()[4:6] == [f"{figures['WT']['spearman']:.3f}", f"{figures['WT']['mae']:.3f}"]
    assert f"{2 * figures['flagged']} of 42 case estimates flagged" in out.stdout
    held = quality.held_out(quality.cases_of(rows))  # the case the WT estimate missed by most is named first
    err, case = max(
        ((e["quality"]["WT"] - r["dice_WT"], r["case"]) for r, e in zip(rows, held)), key=lambda t: abs(t[0])
    )
    assert f"missed most (estimate - true): WT {case} {err:+.2f}," in out.stdout
    out = run(a, "--members", b)  # the members' agreement falls with the true WT Dice: ranks it exactly
    assert out.returncode == 0, out.stderr
    assert "WT: two members' agreement 1.000" in out.stdout
    (tmp_path / "other.json").write_text('{"cpu": {"summary": {}}}')  # not a record of benchmarks/real.py
    out = run(a, tmp_path / "other.json")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == f"{tmp_path / 'other.json'}: not a record of benchmarks/real.py (KeyError: 'per_case')"


def test_the_review_rule_spends_its_budget_on_the_least_trusted_cases():
    """``choose_rule`` catches the bad cases and flags up to ``MAX_FLAGGED`` of all, the least trusted
    first: a margin above the bad cases' estimates, so a new case a little better than the best of
    the bad ones is still flagged (a rule drawn tight around them would not flag it); the tumour
    core's estimate does the flagging where it can (the lowest WT threshold)."""
    rng = np.random.default_rng(0)
    tc = np.r_[rng.uniform(0.2, 0.45, 6), rng.uniform(0.6, 0.95, 34)]  # 6 bad cores among 40 cases
    wt = np.full(40, 0.9)
    train = [{"dice": {"WT": w, "TC": t, "ET": t}} for w, t in zip(wt, tc)]
    estimates = [{"WT": w, "TC": t} for w, t in zip(wt, tc)]  # estimates that rank perfectly
    rule = quality.choose_rule(estimates, train)
    flagged = [e["WT"] < rule["wt"] or e["TC"] < rule["tc"] for e in estimates]
    assert all(flagged[:6])  # every bad case
    assert quality.MAX_FLAGGED * len(train) >= sum(flagged) >= quality.MAX_FLAGGED * len(train) - 2 > 6  # the budget
    assert rule["tc"] > tc[:6].max() + 0.1 and rule["wt"] == 0.4  # a margin, and by the core's estimate
