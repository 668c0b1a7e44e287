"""The quality estimate over several cross-validations: how it ranks and errs on their out-of-fold cases.

    python benchmarks/estimate.py RUN/real-benchmark.json [RUN/real-benchmark.json ...]
    python benchmarks/estimate.py A/real-benchmark.json --members B/real-benchmark.json

Each file is what ``benchmarks/real.py`` writes: every case scored by a fold model that never saw
it, with the quality estimate's features. For each run, every case is estimated by a calibration
fitted on the run's other cases (leave one out, ``unet.quality.held_out``, as the product does it);
printed per run and as the mean (and the worst) over the runs: Spearman's correlation with the true
Dice and the mean absolute error per region, and the bad cases flagged; per run, the cases whose
estimate missed their true Dice by most, per region (positive: the estimate trusted it too much).
On 21 cases one or two cases move a run's figures; the mean over runs is the steadier one.

``--members B``: two runs on the same folds (e.g. ``--seed 0`` and ``--seed 1``) give each case two
segmentations by models that never saw it. Their agreement (the Dice of one against the other, per
region; from the ``oof-<case>.npz`` each fold model keeps) is printed beside the estimate, both
ranked against the first run's true Dice: what an estimate built on member agreement would give, were
every out-of-fold case predicted by two members.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.brats import REGIONS as LABELS  # noqa: E402  (region -> BraTS labels; numpy only)

REGIONS = tuple(LABELS)  # WT, TC, ET
WORST = 3  # cases named per region and run: the estimate's largest errors


def rows_of(path: Path) -> list[dict]:
    """The out-of-fold rows of a ``benchmarks/real.py`` record; a file that is not one: a one-line exit."""
    try:
        (record,) = json.loads(path.read_text()).values()
        rows = record["per_case"]
        missing = next((r["case"] for r in rows if "features" not in r or "est_WT" not in r), None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"{path}: not a record of benchmarks/real.py ({type(e).__name__}: {e})") from None
    if missing:
        raise SystemExit(f"{path}: case {missing} has no quality estimate (a record from before the estimate)")
    return rows


def held_out_figures(rows: list[dict]) -> tuple[dict, str]:
    """The run's leave-one-out figures, and a line naming per region the ``WORST`` cases the estimate
    missed by most (a mean error hides which cases carry it)."""
    from unet import quality

    cases = quality.cases_of(rows)
    estimates = quality.held_out(cases)
    missed = []
    for k in REGIONS:
        errors = sorted(
            ((e["quality"][k] - c["dice"][k], r["case"]) for r, c, e in zip(rows, cases, estimates)),
            key=lambda t: -abs(t[0]),
        )
        missed.append(f"{k} " + ", ".join(f"{case} {err:+.2f}" for err, case in errors[:WORST]))
    return quality.agreement(cases, estimates), "  missed most (estimate - true): " + "; ".join(missed)


def out_of_fold(run: Path, case: str) -> np.ndarray:
    found = list((run.parent / "models").glob(f"*/oof-{case}.npz"))
    if len(found) != 1:
        raise SystemExit(f"{run.parent / 'models'}: {len(found)} out-of-fold segmentations of {case}, not one")
    return np.load(found[0])["labels"]


def members(a: Path, b: Path) -> str:
    from scipy.stats import spearmanr

    from unet.metrics import dice

    rows, other = rows_of(a), {r["case"]: r for r in rows_of(b)}
    agree = {k: [] for k in REGIONS}
    for r in rows:
        la, lb = out_of_fold(a, r["case"]), out_of_fold(b, r["case"])
        for k in REGIONS:
            agree[k].append(dice(np.isin(la, LABELS[k]), np.isin(lb, LABELS[k])))
    first, second = a.parent.name, b.parent.name
    lines = [f"{len(rows)} cases, {first} beside {second}: Spearman with the true Dice of {first}"]
    for k in REGIONS:
        truth = [r[f"dice_{k}"] for r in rows]
        rho_agree = spearmanr(agree[k], truth).statistic
        rho_est = spearmanr([r[f"est_{k}"] for r in rows], truth).statistic
        rho_b = spearmanr([other[r["case"]][f"dice_{k}"] for r in rows], truth).statistic
        lines.append(
            f"  {k}: two members' agreement {rho_agree:.3f}, the estimate {rho_est:.3f}"
            f" (the second run's true Dice: {rho_b:.3f})"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="real-benchmark.json files of benchmarks/real.py")
    p.add_argument("--members", type=Path, help="a second run on the same folds: member agreement beside the estimate")
    args = p.parse_args()
    if args.members:
        print(members(args.runs[0], args.members))
        return 0
    records = [(run.parent.name, rows_of(run)) for run in args.runs]  # every file read before any output
    figures = []
    print(f"{'run':28}" + "".join(f"{'rho ' + k:>9}{'MAE ' + k:>9}" for k in REGIONS) + "  flagged  bad caught")
    for name, rows in records:
        h, missed = held_out_figures(rows)
        figures.append(h)
        cells = "".join(f"{h[k]['spearman']:>9.3f}{h[k]['mae']:>9.3f}" for k in REGIONS)
        print(f"{name:28}{cells}  {h['flagged']:>3}/{h['cases']:<4} {h['bad_flagged']}/{h['bad']}")
        print(missed)
    for name, of_rho, of_mae in (("mean", statistics.fmean, statistics.fmean), ("worst", min, max)):
        cells = "".join(
            f"{of_rho(f[k]['spearman'] for f in figures):>9.3f}{of_mae(f[k]['mae'] for f in figures):>9.3f}"
            for k in REGIONS
        )
        print(f"{name + f' of {len(figures)} runs':28}{cells}")
    total = {k: sum(f[k] for f in figures) for k in ("flagged", "cases", "bad_flagged", "bad")}
    print(
        f"all runs: {total['flagged']} of {total['cases']} case estimates flagged"
        f" ({total['flagged'] / total['cases']:.0%}), {total['bad_flagged']} of {total['bad']} bad ones"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
